"""Plain-PyTorch definitions of every fastrit op: the oracle every backend is tested against.

Contracts (all backends):
- floating inputs may be float32, bfloat16 or float16; arithmetic is float32;
- index tensors (``rows``, ``cols``) are int64;
- shapes are exactly as documented; nothing is broadcast implicitly.

NF4 follows bitsandbytes' format exactly: blocks of ``blocksize`` consecutive elements of the flattened
weight, ``absmax`` per block (float32), each element scaled by ``1 / absmax`` (the last, partial block:
divided by its absmax clamped to >= 1e-38), clamped to [-1, 1] and mapped to the NF4 code whose
bucket holds it (buckets split at the midpoints of consecutive codes; a value on a midpoint goes to the
lower code), two codes per byte with the even element in the high nibble, stored as uint8
``[(numel + 1) // 2, 1]``. Dequantization is ``code[q] * absmax`` in float32, then cast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "NF4_CODE",
    "ig_interpolate",
    "ig_accumulate",
    "ig_accumulate_linear",
    "swiglu_forward",
    "swiglu_backward",
    "row_sparse_grad",
    "col_sparse_grad",
    "nf4_quantize_blocks",
    "nf4_dequantize_blocks",
]

#: The 16 NF4 code values (bitsandbytes' table, ascending; index = the 4-bit code).
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def ig_interpolate(base: torch.Tensor, direction: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """``[m, N, D]``: ``base + alphas[k] * direction``, computed in float32, returned in ``base.dtype``.

    Args: base ``[N, D]``, direction ``[N, D]``, alphas ``[m]``.
    """
    out = base.float()[None] + alphas.float()[:, None, None] * direction.float()[None]
    return out.to(base.dtype)


def ig_accumulate(act: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[N, I]`` float32: ``act * sum_k weights[k] * grads[k]``.

    Args: act ``[N, I]``, grads ``[m, N, I]``, weights ``[m]``.
    """
    return act.float() * torch.einsum("k,kni->ni", weights.float(), grads.float())


def ig_accumulate_linear(
    act: torch.Tensor, grad_resid: torch.Tensor, weight_down: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``[N, I]`` float32: ``act * ((sum_k weights[k] * grad_resid[k]) @ weight_down)``.

    The neuron IG straight from residual-stream gradients. Args: act ``[N, I]``, grad_resid
    ``[m, N, H]``, weight_down ``[H, I]`` (the output projection's weight), weights ``[m]``.
    """
    summed = torch.einsum("k,knh->nh", weights.float(), grad_resid.float())
    return act.float() * (summed @ weight_down.float())


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, I]`` in ``gate.dtype``: ``silu(gate) * up * keep`` (float32 arithmetic).

    Args: gate ``[N, I]``, up ``[N, I]``, keep ``[I]`` bool (None: every neuron kept).
    """
    out = F.silu(gate.float()) * up.float()
    if keep is not None:
        out = out * keep.to(torch.float32)
    return out.to(gate.dtype)


def swiglu_backward(
    grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d_gate, d_up)``, each ``[N, I]`` in ``gate.dtype``, of :func:`swiglu_forward`.

    ``d_up = g * silu(gate) * keep``; ``d_gate = g * up * keep * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))``.
    """
    g = grad_out.float()
    if keep is not None:
        g = g * keep.to(torch.float32)
    x = gate.float()
    sig = torch.sigmoid(x)
    d_up = g * x * sig
    d_gate = g * up.float() * sig * (1.0 + x * (1.0 - sig))
    return d_gate.to(gate.dtype), d_up.to(gate.dtype)


def row_sparse_grad(grad_out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[k, In]`` in ``x.dtype``: ``grad_out[:, rows]^T @ x`` (float32 accumulation).

    The weight gradient of a linear layer ``[O, In]`` for its output rows ``rows`` only. Args:
    grad_out ``[N, O]``, x ``[N, In]``, rows ``[k]`` int64 in ``[0, O)``.
    """
    return (grad_out.float()[:, rows].t() @ x.float()).to(x.dtype)


def col_sparse_grad(grad_out: torch.Tensor, h: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``[H, k]`` in ``h.dtype``: ``grad_out^T @ h[:, cols]`` (float32 accumulation).

    The weight gradient of a linear layer ``[H, I]`` (e.g. down_proj) for its input columns ``cols``
    only. Args: grad_out ``[N, H]``, h ``[N, I]``, cols ``[k]`` int64 in ``[0, I)``.
    """
    return (grad_out.float().t() @ h.float()[:, cols]).to(h.dtype)


def _nf4_code(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def nf4_quantize_blocks(weight: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed uint8 [(numel + 1) // 2, 1], absmax float32 [ceil(numel / blocksize)])`` of ``weight``."""
    flat = weight.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1) if full else flat.new_zeros(0)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)
    if n > full:
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_absmax, -1, 1)])
    if n % 2:
        scaled = F.pad(scaled, (0, 1))
    code = _nf4_code(flat.device)
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    return ((q[0::2] << 4) | q[1::2]).unsqueeze(1), absmax


def nf4_dequantize_blocks(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape: torch.Size | tuple, dtype: torch.dtype
) -> torch.Tensor:
    """The weight of ``shape`` and ``dtype`` from :func:`nf4_quantize_blocks`' output (absmax float32)."""
    n = 1
    for size in shape:
        n *= int(size)
    flat = packed.reshape(-1)
    q = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n].long()
    values = _nf4_code(flat.device)[q]
    block = torch.arange(n, device=flat.device) // blocksize
    return (values * absmax.float()[block]).reshape(shape).to(dtype)
