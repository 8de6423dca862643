"""Weight gradients of a linear layer for chosen rows or columns only (the trainable neurons).

- ``row_sparse_grad_fwd``: ``grad_out[:, rows]^T @ x`` -> ``[k, In]`` (a weight ``[O, In]``, rows = outputs);
- ``col_sparse_grad_fwd``: ``grad_out^T @ h[:, cols]`` -> ``[H, k]`` (a weight ``[H, I]``, cols = inputs).

The chosen columns are gathered by index inside the kernels; the full gradient is never formed. Products
and accumulation are float32 (``tl.dot`` with float32 accumulator; float32 operands in IEEE precision, not
TF32). Semantics: ``fastrit/ops/reference.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, autotune_configs, cast_out, on_device, size_bucket

# 16-bit operands: tensor-core dots
_CONFIGS_16 = [
    triton.Config({"BLOCK_A": 64, "BLOCK_B": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_A": 64, "BLOCK_B": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_A": 128, "BLOCK_B": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_A": 128, "BLOCK_B": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_A": 32, "BLOCK_B": 64, "BLOCK_N": 64}, num_warps=4, num_stages=4),
]
# float32 operands (IEEE, so FMA dots, not tensor cores): the tiles above spill registers on sm_80 and sm_90
_CONFIGS_32 = [
    triton.Config({"BLOCK_A": 64, "BLOCK_B": 64, "BLOCK_N": 16}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_A": 32, "BLOCK_B": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_A": 32, "BLOCK_B": 32, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_A": 64, "BLOCK_B": 128, "BLOCK_N": 16}, num_warps=8, num_stages=3),
]
_CONFIGS = autotune_configs(_CONFIGS_16 + _CONFIGS_32, triton.Config({"BLOCK_A": 16, "BLOCK_B": 32, "BLOCK_N": 16}))


def configs_for(float32_operands: bool) -> list[triton.Config]:
    """The GPU autotune configs of the sparse-gradient kernels for float32 or 16-bit dot operands."""
    return _CONFIGS_32 if float32_operands else _CONFIGS_16


def _prune(configs, named_args, **kwargs):
    if INTERPRET:
        return configs
    args = {**named_args, **kwargs}  # UPCAST is passed by keyword; positional would land in named_args
    float32 = bool(args["UPCAST"]) or args["grad_out"].dtype == torch.float32
    return [config for config in configs if config in configs_for(float32)]


_PRUNE = {"early_config_prune": _prune}


@triton.autotune(configs=_CONFIGS, key=["N_BUCKET", "OUT_F", "IN_F", "K", "UPCAST"], prune_configs_by=_PRUNE)
@triton.jit
def row_sparse_grad_kernel(
    grad_out,
    x,
    rows,
    out,
    N,
    OUT_F,
    IN_F,
    K,
    N_BUCKET,
    UPCAST: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``out[K, IN_F] = grad_out[:, rows]^T @ x``: tile of BLOCK_A chosen rows x BLOCK_B input columns."""
    i_b = tl.program_id(0)
    i_a = tl.program_id(1)
    o_k = i_a * BLOCK_A + tl.arange(0, BLOCK_A)
    o_in = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_k = o_k < K
    m_in = o_in < IN_F
    b_rows = tl.load(rows + o_k, mask=m_k, other=0)
    b_acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        # gathered: grad_out[n, rows[j]] as a [BLOCK_A, BLOCK_N] tile (already transposed)
        p_g = grad_out + o_n[None, :].to(tl.int64) * OUT_F + b_rows[:, None]
        b_g = tl.load(p_g, mask=m_k[:, None] & m_n[None, :], other=0.0)
        p_x = x + o_n[:, None].to(tl.int64) * IN_F + o_in[None, :]
        b_x = tl.load(p_x, mask=m_n[:, None] & m_in[None, :], other=0.0)
        if UPCAST:
            b_g = b_g.to(tl.float32)
            b_x = b_x.to(tl.float32)
        b_acc = tl.dot(b_g, b_x, b_acc, input_precision="ieee")
    p_out = out + o_k[:, None].to(tl.int64) * IN_F + o_in[None, :]
    tl.store(p_out, cast_out(b_acc, out.dtype.element_ty), mask=m_k[:, None] & m_in[None, :])


@triton.autotune(configs=_CONFIGS, key=["N_BUCKET", "H", "INTER", "K", "UPCAST"], prune_configs_by=_PRUNE)
@triton.jit
def col_sparse_grad_kernel(
    grad_out,
    h,
    cols,
    out,
    N,
    H,
    INTER,
    K,
    N_BUCKET,
    UPCAST: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``out[H, K] = grad_out^T @ h[:, cols]``: tile of BLOCK_A output features x BLOCK_B chosen columns."""
    i_a = tl.program_id(0)
    i_b = tl.program_id(1)
    o_h = i_a * BLOCK_A + tl.arange(0, BLOCK_A)
    o_k = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_h = o_h < H
    m_k = o_k < K
    b_cols = tl.load(cols + o_k, mask=m_k, other=0)
    b_acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        # grad_out^T as a [BLOCK_A, BLOCK_N] tile (contiguous along H)
        p_g = grad_out + o_n[None, :].to(tl.int64) * H + o_h[:, None]
        b_g = tl.load(p_g, mask=m_h[:, None] & m_n[None, :], other=0.0)
        # gathered: h[n, cols[j]] as a [BLOCK_N, BLOCK_B] tile
        p_h = h + o_n[:, None].to(tl.int64) * INTER + b_cols[None, :]
        b_h = tl.load(p_h, mask=m_n[:, None] & m_k[None, :], other=0.0)
        if UPCAST:
            b_g = b_g.to(tl.float32)
            b_h = b_h.to(tl.float32)
        b_acc = tl.dot(b_g, b_h, b_acc, input_precision="ieee")
    p_out = out + o_h[:, None].to(tl.int64) * K + o_k[None, :]
    tl.store(p_out, cast_out(b_acc, out.dtype.element_ty), mask=m_h[:, None] & m_k[None, :])


def _upcast(a: torch.Tensor, b: torch.Tensor) -> bool:
    # The interpreter stores bfloat16 as raw uint16 bits: a dot of them would multiply bit patterns. On a GPU,
    # matching half-precision operands go to the tensor cores as they are (fp32 accumulation).
    return INTERPRET or a.dtype != b.dtype


def row_sparse_grad_grid(n_in: int, k: int):
    """The launch grid of :func:`row_sparse_grad_kernel`: input-column tiles on axis 0, chosen rows on axis 1."""
    return lambda meta: (triton.cdiv(n_in, meta["BLOCK_B"]), triton.cdiv(k, meta["BLOCK_A"]))


def col_sparse_grad_grid(hidden: int, k: int):
    """The launch grid of :func:`col_sparse_grad_kernel`: output-feature tiles on axis 0, chosen columns on 1."""
    return lambda meta: (triton.cdiv(hidden, meta["BLOCK_A"]), triton.cdiv(k, meta["BLOCK_B"]))


@on_device
def row_sparse_grad_fwd(grad_out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[k, In]`` in ``x.dtype``: ``grad_out[:, rows]^T @ x`` (float32 accumulation)."""
    n, o = grad_out.shape
    n_in = x.shape[1]
    k = rows.shape[0]
    out = torch.empty((k, n_in), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    row_sparse_grad_kernel[row_sparse_grad_grid(n_in, k)](
        grad_out, x, rows, out, n, o, n_in, k, size_bucket(n), UPCAST=_upcast(grad_out, x)
    )
    return out


@on_device
def col_sparse_grad_fwd(grad_out: torch.Tensor, h: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``[H, k]`` in ``h.dtype``: ``grad_out^T @ h[:, cols]`` (float32 accumulation)."""
    n, hidden = grad_out.shape
    n_i = h.shape[1]
    k = cols.shape[0]
    out = torch.empty((hidden, k), dtype=h.dtype, device=h.device)
    if out.numel() == 0:
        return out
    col_sparse_grad_kernel[col_sparse_grad_grid(hidden, k)](
        grad_out, h, cols, out, n, hidden, n_i, k, size_bucket(n), UPCAST=_upcast(grad_out, h)
    )
    return out
