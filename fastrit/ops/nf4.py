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

import importlib
import math
from types import ModuleType

import torch
import torch.nn.functional as F

from .. import _args
from . import _checks, reference
from ._backend import dispatch

__all__ = ["nf4_quantize", "nf4_dequantize", "nf4_linear", "NF4_BLOCKSIZES", "bnb_nf4_weight", "import_bnb"]

#: block sizes bitsandbytes accepts for 4-bit quantization
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def import_bnb(submodule: str = "functional") -> ModuleType:
    """``bitsandbytes.<submodule>`` (its ``functional`` by default): the one place fastrit imports bitsandbytes.

    Imported on first use, not with fastrit (importing bitsandbytes is slow and probes the GPU). bitsandbytes is
    an install requirement; ImportError saying how to install it when it is missing.
    """
    try:
        return importlib.import_module(f"bitsandbytes.{submodule}")
    except ImportError as error:  # pragma: no cover - bitsandbytes is an install requirement
        raise ImportError("fastrit's NF4 weights need bitsandbytes (pip install bitsandbytes)") from error


def bnb_nf4_weight(module) -> tuple[torch.Tensor, object]:
    """``(packed uint8 [(numel + 1) // 2, 1], QuantState)`` of a quantized ``bitsandbytes.nn.Linear4bit`` with
    quant_type "nf4", in bitsandbytes' standard layout, without a copy where it can (nothing is requantized; the
    module is not changed). :func:`nf4_dequantize` of it is the layer's weight.

    A layer that has already run an inference forward pass on an AVX512-BF16 CPU has been repacked by bitsandbytes
    into a CPU-only layout, its absmax dequantized and rounded to bfloat16: the codes are restored to the standard
    layout (losslessly) and the absmax taken as bitsandbytes now holds it (bfloat16 values as float32, not nested),
    so the numbers are the ones that bnb module computes with.

    TypeError naming ``module`` when it is not a Linear4bit; ValueError when it is not quantized yet, not NF4, or
    its state is not a 2-D bitsandbytes QuantState with the NF4 table.
    """
    bnbf = import_bnb()
    if not isinstance(module, import_bnb("nn").Linear4bit):
        raise TypeError(f"module: expected a bitsandbytes.nn.Linear4bit, got {type(module).__name__}")
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        state = getattr(module, "quant_state", None)
    quant_type = state.quant_type if state is not None else getattr(weight, "quant_type", None)
    if quant_type != "nf4":
        raise ValueError(f"module: expected a Linear4bit with quant_type 'nf4', got {quant_type!r}")
    if state is None or not getattr(weight, "bnb_quantized", state is not None):
        raise ValueError(
            "module: the Linear4bit is not quantized yet (bitsandbytes quantizes it when it is moved to a "
            "device, e.g. module.to('cpu') or module.cuda())"
        )
    if not isinstance(state, bnbf.QuantState) or state.shape is None or len(state.shape) != 2:
        raise ValueError("module: expected a 2-D bitsandbytes QuantState on its weight")
    if state.code is not None and not torch.equal(state.code.float().cpu(), reference.nf4_code()):
        raise ValueError("module: its quant_state.code is not bitsandbytes' NF4 table")
    data = weight.data
    if getattr(state, "packing_format_for_cpu", False):
        shape = (int(state.shape[0]), int(state.shape[1]))
        packed = _unshuffle_cpu_packing(data, shape)
        absmax = state.absmax.T.reshape(-1).float()  # bitsandbytes stores it [in / blocksize, out] in bf16
        return packed, bnbf.QuantState(
            absmax=absmax, shape=torch.Size(shape), dtype=getattr(state, "original_dtype", state.dtype),
            blocksize=state.blocksize, code=reference.nf4_code(packed.device), quant_type="nf4",
        )
    if data.dtype != torch.uint8:  # quant_storage other than uint8: the same bytes, another view
        data = data.contiguous().view(torch.uint8)
    return data, state


def _unshuffle_cpu_packing(weight: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Undo bitsandbytes' AVX512-BF16 CPU repacking (``_convert_weight_packed_for_cpu``, block_n=32).

    ``weight``: uint8 ``[N, K / 2]`` in that layout (per 32 rows and 2 columns, 64 codes stored as 32 bytes: low
    nibbles the first 32 codes, high nibbles the last 32). Returns the standard bitsandbytes packing, uint8
    ``[N * K / 2, 1]``. Lossless: only the codes' positions change.
    """
    n, k = shape
    block_n = 32
    if weight.dtype != torch.uint8:
        weight = weight.view(torch.uint8)
    if n % block_n or k % 2 or weight.numel() * 2 != n * k:
        raise ValueError(f"module: CPU-packed weight of {weight.numel()} bytes does not fit shape {list(shape)}")
    rows = weight.reshape(-1, block_n)
    codes = torch.cat([rows & 0xF, rows >> 4], dim=-1)  # [.., 64]: 32 low nibbles then 32 high nibbles
    codes = codes.reshape(n // block_n, k // 2, block_n, 2).transpose(1, 2).reshape(-1)  # row-major [N * K]
    return ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8).reshape(-1, 1)


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
    _args.one_of("blocksize", blocksize, NF4_BLOCKSIZES)
    packed, absmax = dispatch(
        "nf4_quantize", backend, weight.device, reference.nf4_quantize_blocks, weight.contiguous(), blocksize
    )
    bnbf = import_bnb()
    code = reference.nf4_code(weight.device)
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
    bnbf = import_bnb()
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
    if not isinstance(quant_state, import_bnb().QuantState):
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
