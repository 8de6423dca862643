"""SwiGLU with a neuron keep-mask: ``silu(gate) * up * keep`` and its backward in one pass.

Semantics: ``fastrit/ops/reference.py`` (``swiglu_forward`` / ``swiglu_backward``), float32 arithmetic,
outputs in ``gate.dtype``. ``keep`` is a bool ``[I]`` mask of the neurons kept (None: all of them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import autotune_configs, cast_out, on_device, size_bucket

_CONFIGS = autotune_configs(
    [
        triton.Config({"BLOCK_N": 1, "BLOCK_I": 1024}, num_warps=4),
        triton.Config({"BLOCK_N": 4, "BLOCK_I": 512}, num_warps=4),
        triton.Config({"BLOCK_N": 4, "BLOCK_I": 1024}, num_warps=8),
        triton.Config({"BLOCK_N": 8, "BLOCK_I": 512}, num_warps=8),
    ],
    triton.Config({"BLOCK_N": 4, "BLOCK_I": 64}),
)


@triton.jit
def _load_tile(x, o_n, o_i, m, INTER):
    return tl.load(x + o_n[:, None].to(tl.int64) * INTER + o_i[None, :], mask=m, other=0.0).to(tl.float32)


@triton.autotune(configs=_CONFIGS, key=["N_BUCKET", "INTER", "HAS_KEEP"])
@triton.jit
def swiglu_fwd_kernel(
    gate, up, keep, out, N, INTER, N_BUCKET, HAS_KEEP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr
):
    i_n = tl.program_id(0)
    i_i = tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_i = i_i * BLOCK_I + tl.arange(0, BLOCK_I)
    m_i = o_i < INTER
    m = (o_n < N)[:, None] & m_i[None, :]
    b_gate = _load_tile(gate, o_n, o_i, m, INTER)
    b_up = _load_tile(up, o_n, o_i, m, INTER)
    b_sig = 1.0 / (1.0 + tl.exp(-b_gate))
    b_out = b_gate * b_sig * b_up
    if HAS_KEEP:
        b_keep = tl.load(keep + o_i, mask=m_i, other=0).to(tl.float32)
        b_out = b_out * b_keep[None, :]
    p_out = out + o_n[:, None].to(tl.int64) * INTER + o_i[None, :]
    tl.store(p_out, cast_out(b_out, out.dtype.element_ty), mask=m)


@triton.autotune(configs=_CONFIGS, key=["N_BUCKET", "INTER", "HAS_KEEP"])
@triton.jit
def swiglu_bwd_kernel(
    grad_out,
    gate,
    up,
    keep,
    d_gate,
    d_up,
    N,
    INTER,
    N_BUCKET,
    HAS_KEEP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_i = tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_i = i_i * BLOCK_I + tl.arange(0, BLOCK_I)
    m_i = o_i < INTER
    m = (o_n < N)[:, None] & m_i[None, :]
    b_g = _load_tile(grad_out, o_n, o_i, m, INTER)
    if HAS_KEEP:
        b_keep = tl.load(keep + o_i, mask=m_i, other=0).to(tl.float32)
        b_g = b_g * b_keep[None, :]
    b_gate = _load_tile(gate, o_n, o_i, m, INTER)
    b_up = _load_tile(up, o_n, o_i, m, INTER)
    b_sig = 1.0 / (1.0 + tl.exp(-b_gate))
    b_d_up = b_g * b_gate * b_sig
    b_d_gate = b_g * b_up * b_sig * (1.0 + b_gate * (1.0 - b_sig))
    o_out = o_n[:, None].to(tl.int64) * INTER + o_i[None, :]
    tl.store(d_up + o_out, cast_out(b_d_up, d_up.dtype.element_ty), mask=m)
    tl.store(d_gate + o_out, cast_out(b_d_gate, d_gate.dtype.element_ty), mask=m)


def swiglu_grid(n: int, i: int):
    """The launch grid of both SwiGLU kernels: rows on axis 0 (up to 2**31 - 1 programs), columns on axis 1."""
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(i, meta["BLOCK_I"]))


def _keep_arg(keep: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    if keep is None:
        return fallback
    # a bool pointer is loaded as int1 (one byte per element); uint8 is the same memory, loaded plainly
    return keep.view(torch.uint8) if keep.dtype == torch.bool else keep


@on_device
def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, I]`` in ``gate.dtype``: ``silu(gate) * up * keep`` (float32 arithmetic)."""
    n, i = gate.shape
    out = torch.empty((n, i), dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    swiglu_fwd_kernel[swiglu_grid(n, i)](
        gate, up, _keep_arg(keep, gate), out, n, i, size_bucket(n), HAS_KEEP=keep is not None
    )
    return out


@on_device
def swiglu_bwd(
    grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d_gate, d_up)``, each ``[N, I]`` in ``gate.dtype``, of :func:`swiglu_fwd`, in one pass."""
    n, i = gate.shape
    d_gate = torch.empty((n, i), dtype=gate.dtype, device=gate.device)
    d_up = torch.empty((n, i), dtype=gate.dtype, device=gate.device)
    if d_gate.numel() == 0:
        return d_gate, d_up
    swiglu_bwd_kernel[swiglu_grid(n, i)](
        grad_out, gate, up, _keep_arg(keep, gate), d_gate, d_up, n, i, size_bucket(n), HAS_KEEP=keep is not None
    )
    return d_gate, d_up
