"""Plain-PyTorch definitions of every fastrit op: the oracle every backend is tested against.

Contracts (all backends):
- floating inputs may be float32, bfloat16 or float16; arithmetic is float32;
- index tensors (``rows``, ``cols``) are int64;
- shapes are exactly as documented; nothing is broadcast implicitly.

NF4 follows bitsandbytes' format exactly: blocks of ``blocksize`` consecutive elements of the flattened
weight, ``absmax`` per block (float32), two codes per byte with the even element in the high nibble, stored
as uint8 ``[(numel + 1) // 2, 1]``; an odd numel pads one ``0.0`` element. bitsandbytes' own CPU and CUDA
kernels round differently, so the NF4 functions take a ``rule`` ("cpu" or "cuda"; default: the tensor's
device type) and every fastrit backend applies the rule of the tensor's device:

- "cpu" (bitsandbytes' CPU backend): each element of a full block is multiplied by ``1 / max(absmax, 1e-38)``,
  the final partial block divided by its absmax clamped to >= 1e-38 (the clamped value is stored), clamped
  to [-1, 1] and mapped to the number of code midpoints ``(code[i] + code[i + 1]) / 2`` (float32) below it.
  Dequantization: ``code[q] * absmax`` in float32, then cast.
- "cuda" (bitsandbytes' CUDA kernels, built with fast math; read off their sm_90 SASS): subnormals flush to
  zero (FTZ) in every float operation; absmax is the maximum of ``|x|`` ignoring NaN, starting from
  ``-FLT_MAX`` (a partial block also sees its 0.0 padding), stored as it is (0 for an all-zero block);
  each element is multiplied by the approximate reciprocal of absmax (``rcp.approx.ftz.f32``: 1/0 = inf,
  so an all-zero block scales to NaN) and its code is the number of :data:`NF4_CUDA_THRESHOLDS` strictly
  below it (NaN: code 0). Dequantization: ``code[q] * absmax`` in float32 with FTZ, then cast. This module
  computes the reciprocal correctly rounded (PyTorch has no approximate one): the GPU kernels, which use
  the hardware instruction, can differ from it where a scaled value lies within an ulp of a threshold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# the one NF4 table (plain Python, shared with the Triton kernels; csrc/nf4_code.h is generated from it)
from .. import _args
from ..kernels.nf4_code import NF4_CODE, NF4_CUDA_THRESHOLDS

__all__ = [
    "NF4_CODE",
    "NF4_CUDA_THRESHOLDS",
    "NF4_RULES",
    "nf4_rule",
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

#: The NF4 rounding rules: bitsandbytes' CPU backend and its CUDA kernels.
NF4_RULES = ("cpu", "cuda")


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


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """:data:`NF4_CODE` as float32 ``[16]`` on ``device``."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def nf4_rule(device: torch.device, rule: str | None = None) -> str:
    """``rule`` checked, or the rule of tensors on ``device``: "cuda" on CUDA devices, "cpu" elsewhere."""
    if rule is None:
        return "cuda" if device.type == "cuda" else "cpu"
    _args.one_of("rule", rule, NF4_RULES)
    return rule


def nf4_cuda_thresholds(device: torch.device) -> torch.Tensor:
    """:data:`NF4_CUDA_THRESHOLDS` as float32 ``[15]`` on ``device``."""
    return torch.tensor(NF4_CUDA_THRESHOLDS, dtype=torch.int64).to(torch.int32).view(torch.float32).to(device)


_FLT_MIN = torch.finfo(torch.float32).tiny
_FLT_MAX = torch.finfo(torch.float32).max


def flush_subnormal(x: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` with subnormals replaced by a zero of the same sign (FTZ)."""
    return torch.where(x.abs() < _FLT_MIN, x * 0.0, x)


def nf4_quantize_blocks(
    weight: torch.Tensor, blocksize: int, rule: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed uint8 [(numel + 1) // 2, 1], absmax float32 [ceil(numel / blocksize)])`` of ``weight``."""
    if nf4_rule(weight.device, rule) == "cuda":
        return _nf4_quantize_cuda_rule(weight, blocksize)
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
    code = nf4_code(flat.device)
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    return ((q[0::2] << 4) | q[1::2]).unsqueeze(1), absmax


def _nf4_quantize_cuda_rule(weight: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = flush_subnormal(weight.reshape(-1).float())
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    # the partial block's padding reads as 0.0 (it takes part in the maximum; an odd numel's pad is coded)
    padded = F.pad(flat, (0, n_blocks * blocksize - n)).reshape(n_blocks, blocksize)
    magnitude = torch.where(padded.isnan(), -_FLT_MAX, padded.abs())
    absmax = magnitude.amax(dim=-1) if n else flat.new_zeros(0)
    inverse = flush_subnormal(1.0 / absmax)  # 1 / 0 = inf, 1 / -FLT_MAX flushes to -0.0
    scaled = flush_subnormal(padded * inverse[:, None]).reshape(-1)[: n + n % 2]
    q = (scaled[:, None] > nf4_cuda_thresholds(flat.device)[None, :]).sum(dim=1).to(torch.uint8)  # NaN: 0
    return ((q[0::2] << 4) | q[1::2]).unsqueeze(1), absmax


def nf4_dequantize_blocks(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    shape: torch.Size | tuple,
    dtype: torch.dtype,
    rule: str | None = None,
) -> torch.Tensor:
    """The weight of ``shape`` and ``dtype`` from :func:`nf4_quantize_blocks`' output (absmax float32)."""
    n = 1
    for size in shape:
        n *= int(size)
    flat = packed.reshape(-1)
    q = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n].long()
    values = nf4_code(flat.device)[q]
    scale = absmax.float()[torch.arange(n, device=flat.device) // blocksize]
    if nf4_rule(packed.device, rule) == "cuda":
        return flush_subnormal(values * flush_subnormal(scale)).reshape(shape).to(dtype)
    return (values * scale).reshape(shape).to(dtype)
