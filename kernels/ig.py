"""Integrated-Gradients kernels: interpolation of the site activation and accumulation of the gradients.

- ``ig_interpolate_fwd``: ``[m, N, D]`` rows ``base + alphas[k] * direction``;
- ``ig_accumulate_fwd``: ``act * sum_k weights[k] * grads[k]`` (float32);
- ``ig_accumulate_linear_fwd``: ``act * ((sum_k weights[k] * grad_resid[k]) @ weight_down)`` (float32), as a
  weighted sum into a float32 ``[N, H]`` buffer and a matmul with the ``* act`` epilogue; the ``[m, N, I]``
  neuron gradients are never formed.

Semantics: ``fastrit/ops/reference.py`` (float32 arithmetic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import autotune_configs, cast_out, on_device, size_bucket

# ---------------------------------------------------------------------------------------------------------------------
# interpolate


@triton.autotune(
    configs=autotune_configs(
        [
            triton.Config({"BLOCK_D": 1024, "BLOCK_M": 4}, num_warps=4),
            triton.Config({"BLOCK_D": 2048, "BLOCK_M": 4}, num_warps=8),
            triton.Config({"BLOCK_D": 1024, "BLOCK_M": 16}, num_warps=4),
            triton.Config({"BLOCK_D": 4096, "BLOCK_M": 8}, num_warps=8),
        ],
        triton.Config({"BLOCK_D": 256, "BLOCK_M": 4}),
    ),
    key=["ND_BUCKET", "M"],
)
@triton.jit
def ig_interpolate_kernel(
    base, direction, alphas, out, ND, M, ND_BUCKET, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr
):
    """One program: BLOCK_D elements of base/direction (read once), written for BLOCK_M alphas."""
    i_d = tl.program_id(0)
    i_m = tl.program_id(1)
    o_d = i_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < ND
    b_base = tl.load(base + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_dir = tl.load(direction + o_d, mask=m_d, other=0.0).to(tl.float32)
    for j in tl.static_range(BLOCK_M):
        i_k = i_m * BLOCK_M + j
        m_k = i_k < M
        b_alpha = tl.load(alphas + i_k, mask=m_k, other=0.0).to(tl.float32)
        b_out = b_base + b_alpha * b_dir
        p_out = out + i_k.to(tl.int64) * ND + o_d
        tl.store(p_out, cast_out(b_out, out.dtype.element_ty), mask=m_d & m_k)


def ig_interpolate_grid(nd: int, m: int):
    """The launch grid of :func:`ig_interpolate_kernel` for ``nd`` elements and ``m`` steps."""
    return lambda meta: (triton.cdiv(nd, meta["BLOCK_D"]), triton.cdiv(m, meta["BLOCK_M"]))


@on_device
def ig_interpolate_fwd(base: torch.Tensor, direction: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """``[m, N, D]`` in ``base.dtype``: ``base + alphas[k] * direction`` (float32, bit-exact with the reference)."""
    n, d = base.shape
    m = alphas.shape[0]
    out = torch.empty((m, n, d), dtype=base.dtype, device=base.device)
    nd = n * d
    if out.numel() == 0:
        return out
    # no fused multiply-add: every multiply and add rounds on its own, as in the reference (bit-exact)
    ig_interpolate_kernel[ig_interpolate_grid(nd, m)](
        base, direction, alphas, out, nd, m, size_bucket(nd), enable_fp_fusion=False
    )
    return out


# ---------------------------------------------------------------------------------------------------------------------
# weighted sum over the steps (optionally times the activation)


@triton.autotune(
    configs=autotune_configs(
        [
            triton.Config({"BLOCK": 512}, num_warps=4),
            triton.Config({"BLOCK": 1024}, num_warps=4),
            triton.Config({"BLOCK": 2048}, num_warps=8),
        ],
        triton.Config({"BLOCK": 256}),
    ),
    key=["NI_BUCKET", "M", "HAS_ACT"],
)
@triton.jit
def ig_weighted_sum_kernel(grads, weights, act, out, NI, M, NI_BUCKET, HAS_ACT: tl.constexpr, BLOCK: tl.constexpr):
    """``out[e] = (act[e] *) sum_k weights[k] * grads[k, e]`` over the flattened ``e < NI``, in float32."""
    i_e = tl.program_id(0)
    o_e = i_e.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_e = o_e < NI
    b_acc = tl.zeros([BLOCK], dtype=tl.float32)
    p_g = grads + o_e
    for i_k in range(0, M):
        b_w = tl.load(weights + i_k).to(tl.float32)
        b_g = tl.load(p_g, mask=m_e, other=0.0).to(tl.float32)
        b_acc += b_w * b_g
        p_g += NI
    if HAS_ACT:
        b_act = tl.load(act + o_e, mask=m_e, other=0.0).to(tl.float32)
        b_acc = b_act * b_acc
    tl.store(out + o_e, b_acc, mask=m_e)


def ig_weighted_sum_grid(ni: int):
    """The launch grid of :func:`ig_weighted_sum_kernel` for ``ni`` output elements."""
    return lambda meta: (triton.cdiv(ni, meta["BLOCK"]),)


def _weighted_sum(grads: torch.Tensor, weights: torch.Tensor, act: torch.Tensor | None) -> torch.Tensor:
    m, n, i = grads.shape
    out = torch.empty((n, i), dtype=torch.float32, device=grads.device)
    ni = n * i
    if ni == 0:
        return out
    has_act = act is not None
    ig_weighted_sum_kernel[ig_weighted_sum_grid(ni)](
        grads, weights, act if has_act else out, out, ni, m, size_bucket(ni), HAS_ACT=has_act
    )
    return out


@on_device
def ig_accumulate_fwd(act: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[N, I]`` float32: ``act * sum_k weights[k] * grads[k]``."""
    return _weighted_sum(grads, weights, act)


# ---------------------------------------------------------------------------------------------------------------------
# summed residual gradient @ weight_down, times the activation


@triton.autotune(
    configs=autotune_configs(
        [
            # float32 IEEE dots (FMA, not tensor cores): larger tiles, or 4 stages, spill on sm_80 / sm_90
            triton.Config({"BLOCK_N": 16, "BLOCK_I": 128, "BLOCK_H": 32}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 32, "BLOCK_I": 128, "BLOCK_H": 32}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 64, "BLOCK_I": 128, "BLOCK_H": 16}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_N": 32, "BLOCK_I": 64, "BLOCK_H": 16}, num_warps=4, num_stages=2),
        ],
        triton.Config({"BLOCK_N": 16, "BLOCK_I": 32, "BLOCK_H": 32}),
    ),
    key=["N_BUCKET", "H", "INTER"],
)
@triton.jit
def ig_linear_act_kernel(
    summed, weight, act, out, N, H, INTER, N_BUCKET,
    BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """``out[N, I] = act * (summed[N, H] (float32) @ weight[H, I])`` with ``I = INTER``, all in float32.

    Rows on grid axis 0 (up to 2**31 - 1 programs: any N), the INTER tiles on axis 1.
    """
    i_n = tl.program_id(0)
    i_i = tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_i = i_i * BLOCK_I + tl.arange(0, BLOCK_I)
    m_n = o_n < N
    m_i = o_i < INTER
    b_acc = tl.zeros([BLOCK_N, BLOCK_I], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        o_h = h0 + tl.arange(0, BLOCK_H)
        m_h = o_h < H
        p_s = summed + o_n[:, None].to(tl.int64) * H + o_h[None, :]
        b_s = tl.load(p_s, mask=m_n[:, None] & m_h[None, :], other=0.0)
        p_w = weight + o_h[:, None].to(tl.int64) * INTER + o_i[None, :]
        b_w = tl.load(p_w, mask=m_h[:, None] & m_i[None, :], other=0.0).to(tl.float32)
        b_acc = tl.dot(b_s, b_w, b_acc, input_precision="ieee")
    p_a = act + o_n[:, None].to(tl.int64) * INTER + o_i[None, :]
    m_out = m_n[:, None] & m_i[None, :]
    b_act = tl.load(p_a, mask=m_out, other=0.0).to(tl.float32)
    p_out = out + o_n[:, None].to(tl.int64) * INTER + o_i[None, :]
    tl.store(p_out, b_act * b_acc, mask=m_out)


def ig_linear_act_grid(n: int, i: int):
    """The launch grid of :func:`ig_linear_act_kernel` for ``n`` rows and ``i`` neurons."""
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(i, meta["BLOCK_I"]))


@on_device
def ig_accumulate_linear_fwd(
    act: torch.Tensor, grad_resid: torch.Tensor, weight_down: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``[N, I]`` float32: ``act * ((sum_k weights[k] * grad_resid[k]) @ weight_down)``."""
    n, i = act.shape
    h = weight_down.shape[0]
    out = torch.empty((n, i), dtype=torch.float32, device=act.device)
    if out.numel() == 0:
        return out
    summed = _weighted_sum(grad_resid, weights, None)  # [N, H] float32
    ig_linear_act_kernel[ig_linear_act_grid(n, i)](summed, weight_down, act, out, n, h, i, size_bucket(n))
    return out

