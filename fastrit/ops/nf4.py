"""NF4 frozen weights in bitsandbytes' exact format: quantize, dequantize, and a linear layer.

The 4-bit codes and per-block absmax are computed by fastrit's kernels, with the rounding of bitsandbytes'
kernel for the tensor's device (its CPU backend on CPU tensors, its CUDA kernels on CUDA tensors; the two
differ, see ``reference.nf4_quantize_blocks``); with
``compress_statistics=True`` the absmax values are themselves quantized to 8 bits with
bitsandbytes' own ``quantize_blockwise`` (blocks of 256 after subtracting their mean), exactly as
``bitsandbytes.functional.quantize_4bit`` does, and the result carries a bitsandbytes ``QuantState``,
so weights interchange both ways.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _checks, reference
from ._backend import dispatch

__all__ = ["nf4_quantize", "nf4_dequantize", "nf4_linear", "NF4_BLOCKSIZES"]

#: block sizes bitsandbytes accepts for 4-bit quantization
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _bnb():
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as error:  # pragma: no cover - bitsandbytes is an install requirement
        raise ImportError("fastrit's NF4 ops need bitsandbytes (pip install bitsandbytes)") from error
    return bnbf


def nf4_quantize(
    weight: torch.Tensor, blocksize: int = 64, compress_statistics: bool = True, *, backend: str = "auto"
):
    """Quantize ``weight`` to NF4: ``(packed uint8 [(numel + 1) // 2, 1], bitsandbytes QuantState)``.

    The packed bytes equal ``bitsandbytes.functional.quantize_4bit(weight, blocksize, compress_statistics,
    quant_type="nf4")``'s on the same device (on CUDA tensors with ``backend="torch"``, up to the approximate
    reciprocal: see ``reference.nf4_quantize_blocks``).
    """
    _checks.tensor("weight", weight)
    if weight.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"weight: expected float32, bfloat16 or float16, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError("weight: cannot quantize an empty tensor")
    if blocksize not in NF4_BLOCKSIZES:
        raise ValueError(f"blocksize: expected one of {NF4_BLOCKSIZES}, got {blocksize!r}")
    packed, absmax = dispatch(
        "nf4_quantize", backend, weight.device, reference.nf4_quantize_blocks, weight.contiguous(), blocksize
    )
    bnbf = _bnb()
    code = torch.tensor(reference.NF4_CODE, dtype=torch.float32, device=weight.device)
    if compress_statistics:
        offset = absmax.mean()
        qabsmax, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
        state = bnbf.QuantState(
            absmax=qabsmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, code=code,
            quant_type="nf4", offset=offset, state2=state2,
        )
    else:
        state = bnbf.QuantState(
            absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, code=code, quant_type="nf4"
        )
    return packed, state


def _block_absmax(packed: torch.Tensor, quant_state) -> tuple[torch.Tensor, int]:
    """Check ``quant_state`` against ``packed``; return the float32 absmax per block and the numel."""
    bnbf = _bnb()
    if not isinstance(quant_state, bnbf.QuantState):
        raise TypeError(f"quant_state: expected a bitsandbytes QuantState, got {type(quant_state).__name__}")
    if quant_state.quant_type != "nf4":
        raise ValueError(f"quant_state: expected quant_type 'nf4', got {quant_state.quant_type!r}")
    if quant_state.blocksize not in NF4_BLOCKSIZES:
        raise ValueError(f"quant_state: unsupported blocksize {quant_state.blocksize}")
    numel = math.prod(quant_state.shape)
    _checks.tensor("packed", packed)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed: expected uint8 packed codes, got {packed.dtype}")
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(
            f"quant_state: shape {list(quant_state.shape)} needs {(numel + 1) // 2} packed bytes, "
            f"packed holds {packed.numel()}"
        )
    blocks = math.ceil(numel / quant_state.blocksize)
    if quant_state.absmax.numel() != blocks:
        raise ValueError(f"quant_state: expected {blocks} absmax values, got {quant_state.absmax.numel()}")
    absmax = quant_state.absmax
    if quant_state.nested:
        # the same steps, in the same order, as bitsandbytes.functional.dequantize_4bit
        absmax = bnbf.dequantize_blockwise(quant_state.absmax, quant_state.state2)
        absmax += quant_state.offset
    if absmax.device != packed.device:
        raise ValueError(f"quant_state: absmax is on {absmax.device}, packed on {packed.device}")
    return absmax.float().contiguous(), numel


def nf4_dequantize(packed: torch.Tensor, quant_state, *, backend: str = "auto") -> torch.Tensor:
    """The weight (``quant_state.shape``, ``quant_state.dtype``) of NF4 ``packed`` codes.

    Bit for bit equal to ``bitsandbytes.functional.dequantize_4bit(packed, quant_state)`` on the same device
    (code value times block absmax in float32, then cast; on CUDA tensors a flush-to-zero multiply, as
    bitsandbytes' CUDA kernel).
    """
    absmax, _ = _block_absmax(packed, quant_state)
    shape, dtype, blocksize = tuple(quant_state.shape), quant_state.dtype, quant_state.blocksize
    args = (packed.contiguous(), absmax, blocksize, list(shape), dtype)
    return dispatch("nf4_dequantize", backend, packed.device, reference.nf4_dequantize_blocks, *args)


def nf4_linear(
    x: torch.Tensor, packed: torch.Tensor, quant_state, bias: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """``x @ dequant(W)^T + bias`` for a frozen NF4 weight ``W [out, in]``.

    Differentiable in ``x`` and ``bias``; the weight gets no gradient.
    """
    _checks.tensor("x", x)
    if x.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"x: expected float32, bfloat16 or float16, got {x.dtype}")
    if not isinstance(quant_state, _bnb().QuantState):
        raise TypeError(f"quant_state: expected a bitsandbytes QuantState, got {type(quant_state).__name__}")
    if len(quant_state.shape) != 2:
        raise ValueError(f"quant_state: expected a 2-D weight [out, in], got shape {list(quant_state.shape)}")
    if x.dim() < 1 or x.shape[-1] != quant_state.shape[1]:
        raise ValueError(f"x: expected last dimension {quant_state.shape[1]} (in_features), got {list(x.shape)}")
    if bias is not None:
        _checks.tensor("bias", bias)
        if bias.shape != (quant_state.shape[0],):
            raise ValueError(f"bias: expected shape [{quant_state.shape[0]}], got {list(bias.shape)}")
    weight = nf4_dequantize(packed, quant_state, backend=backend).to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    if x.device.type == "cpu" and x.dtype != torch.float32 and torch.is_grad_enabled() and x.requires_grad:
        return _LinearTransposedBackward.apply(x, weight, bias)
    # autograd keeps ``weight`` for the backward pass, saved before the product is formed (a checkpoint's recompute
    # that ends here stops before it)
    return F.linear(x, weight, bias)


class _LinearTransposedBackward(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` for 16-bit CPU tensors, the weight gradient never formed: backward forms
    ``grad @ weight`` as ``F.linear(grad, weight^T)``. On a CPU without native bf16 arithmetic a 16-bit product
    is fast only with its second operand transposed (``a @ B^T``): ``[..., out] @ [out, in]`` as autograd would
    form it runs about 20x slower. The weight is saved after the product (unlike F.linear's autograd), so a
    checkpoint's recompute forms it: a CPU cost only."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        grad_x = F.linear(grad_out, weight.t().contiguous()) if ctx.needs_input_grad[0] else None
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias
