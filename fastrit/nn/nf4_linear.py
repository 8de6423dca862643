"""NF4Linear: a frozen linear layer whose weight is stored in bitsandbytes' NF4 format.

The weight ``W [out, in]`` is kept only as 4-bit codes plus its quantization state, all as buffers, so that
``.to(device)``, ``.cuda()``, ``state_dict()`` and ``load_state_dict()`` carry them; nothing in the module is a
parameter and nothing ever requires grad. The forward pass dequantizes ``W`` (fastrit.ops.nf4_dequantize, bit for
bit bitsandbytes' ``dequantize_4bit``) and multiplies with it (fastrit.ops.nf4_linear). When the input needs a
gradient, autograd keeps that dequantized weight for the backward pass, which reuses it: each weight is dequantized
once per forward, and once more per recompute under gradient checkpointing, whose recompute of a layer runs just
before that layer's backward, so that one checkpointed layer's dequantized weights are alive at a time. The weight
is saved before the product is formed (on 16-bit CPU tensors, after it: fastrit.ops.nf4), so a checkpoint's
recompute that ends at this layer stops before that product.

Buffers (state_dict keys):

- ``packed``: uint8 ``[(out * in + 1) // 2, 1]``, two codes per byte, the even element in the high nibble;
- ``absmax``: float32 ``[blocks]`` per-block absmax, or, when ``nested`` (double quantization), uint8 ``[blocks]``
  8-bit codes of ``absmax - offset``;
- when ``nested``: ``nested_absmax`` float32 ``[ceil(blocks / nested_blocksize)]``, ``nested_code`` float32
  ``[256]`` (the 8-bit code table) and ``offset`` float32 ``[]`` (the mean absmax);
- ``bias``: ``[out]`` (any float dtype; ``load_state_dict`` adopts the saved one) or None.

``code`` (the 16 NF4 values, float32) is a non-persistent buffer: it follows the module's device and is not saved.

``.to(dtype)`` / ``.half()`` / ``.double()`` never touch the quantized weight: ``packed``, the quantization state
and ``weight_dtype`` keep their dtypes (they only move between devices); only ``bias`` is cast, as in nn.Linear.
The forward pass casts the weight and the bias to the input's dtype anyway.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import _args, ops
from ..ops import _checks, reference
from ..ops.nf4 import bnb_nf4_weight, import_bnb

__all__ = ["NF4Linear"]

#: buffers holding the quantized weight: moved between devices, never cast to another dtype
_STATE_BUFFERS = ("packed", "absmax", "nested_absmax", "nested_code", "offset", "code")


class NF4Linear(nn.Module):
    """A frozen linear layer ``y = x @ W^T + bias`` with ``W [out_features, in_features]`` stored as NF4.

    The format is bitsandbytes' (``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")``), so weights
    interchange with ``bitsandbytes.nn.Linear4bit`` both ways (``from_bnb``, ``quant_state``). Build one with
    ``from_weight``, ``from_linear`` or ``from_bnb``; the constructor makes an empty (all-zero) layer of the given
    configuration, to be filled by ``load_state_dict`` from a layer saved with the same configuration.

    Attributes:
        in_features, out_features: the weight's shape ``[out_features, in_features]``.
        blocksize: values per absmax block (64, bitsandbytes' default).
        nested: whether the absmax values are double-quantized (bitsandbytes' ``compress_statistics``).
        nested_blocksize: block size of that second quantization (256, as in bitsandbytes).
        weight_dtype: the dtype ``dequantize()`` returns (the original weight's, bitsandbytes' ``QuantState.dtype``).
        backend: the fastrit.ops backend the forward and backward dequantize with ("auto" picks per device).
        bias: a frozen float buffer ``[out_features]`` (not a Parameter, so no ``requires_grad_()`` or optimizer
            can ever make it trainable), or None.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    offset: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        blocksize: int = 64,
        nested: bool = True,
        nested_blocksize: int = 256,
        weight_dtype: torch.dtype = torch.float32,
        bias_dtype: torch.dtype | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _args.positive("in_features", in_features)
        _args.positive("out_features", out_features)
        _args.one_of("blocksize", blocksize, ops.NF4_BLOCKSIZES)
        _args.positive("nested_blocksize", nested_blocksize)
        if weight_dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"weight_dtype: expected float32, bfloat16 or float16, got {weight_dtype!r}")
        if bias_dtype is not None and not bias_dtype.is_floating_point:
            raise TypeError(f"bias_dtype: expected a float dtype, got {bias_dtype!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.blocksize = blocksize
        self.nested = bool(nested)
        self.nested_blocksize = nested_blocksize
        self.weight_dtype = weight_dtype
        self.backend = backend

        numel = in_features * out_features
        blocks = math.ceil(numel / blocksize)
        self.register_buffer("packed", torch.zeros((numel + 1) // 2, 1, dtype=torch.uint8, device=device))
        self.register_buffer("code", reference.nf4_code(device), persistent=False)
        if self.nested:
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8, device=device))
            nested_blocks = math.ceil(blocks / nested_blocksize)
            self.register_buffer("nested_absmax", torch.zeros(nested_blocks, dtype=torch.float32, device=device))
            self.register_buffer("nested_code", torch.zeros(256, dtype=torch.float32, device=device))
            self.register_buffer("offset", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.float32, device=device))
            self.register_buffer("nested_absmax", None)
            self.register_buffer("nested_code", None)
            self.register_buffer("offset", None)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype or weight_dtype, device=device))
        else:
            self.register_buffer("bias", None)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def _from_state(
        cls, packed: torch.Tensor, state, bias: torch.Tensor | None, backend: str, argument: str
    ) -> NF4Linear:
        """A layer holding ``packed`` and the bitsandbytes QuantState ``state`` (copied, never requantized)."""
        out_features, in_features = (int(s) for s in state.shape)
        nested_blocksize = state.state2.blocksize if state.nested else 256
        layer = cls(
            in_features, out_features, bias=bias is not None, blocksize=state.blocksize, nested=state.nested,
            nested_blocksize=nested_blocksize, weight_dtype=state.dtype,
            bias_dtype=None if bias is None else bias.dtype, backend=backend, device=packed.device,
        )
        if state.nested and state.state2.absmax.dtype != torch.float32:
            raise ValueError(f"{argument}: expected float32 nested absmax, got {state.state2.absmax.dtype}")
        if state.nested and state.absmax.dtype != torch.uint8:
            raise ValueError(f"{argument}: expected uint8 double-quantized absmax, got {state.absmax.dtype}")
        with torch.no_grad():
            tensors = {"packed": packed.reshape(-1, 1), "absmax": state.absmax}
            if state.nested:
                tensors.update(nested_absmax=state.state2.absmax, nested_code=state.state2.code, offset=state.offset)
            if bias is not None:
                tensors["bias"] = bias
            for name, value in tensors.items():
                own = getattr(layer, name)
                value = value.detach()
                if value.numel() != own.numel():
                    raise ValueError(f"{argument}: {name} has {value.numel()} values, expected {own.numel()}")
                if name == "absmax" and not state.nested:
                    value = value.float()
                if value.dtype != own.dtype:
                    raise ValueError(f"{argument}: {name} has dtype {value.dtype}, expected {own.dtype}")
                own.copy_(value.reshape(own.shape))
        return layer

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        blocksize: int = 64,
        compress_statistics: bool = True,
        backend: str = "auto",
    ) -> NF4Linear:
        """Quantize ``weight`` (float32/bfloat16/float16 ``[out, in]``) to NF4 with fastrit.ops.nf4_quantize.

        ``bias``: ``[out]`` float tensor or None, copied (detached) as a frozen buffer. ``blocksize`` and
        ``compress_statistics`` (double quantization) default to bitsandbytes Linear4bit's. The bytes equal
        ``bitsandbytes.functional.quantize_4bit(weight, blocksize, compress_statistics, quant_type="nf4")``'s on
        the weight's device. ``backend`` is used to quantize and kept for the forward and backward passes.
        """
        _checks.tensor("weight", weight)
        if weight.dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"weight: expected float32, bfloat16 or float16, got {weight.dtype}")
        if weight.dim() != 2:
            raise ValueError(f"weight: expected a 2-D tensor [out, in], got shape {list(weight.shape)}")
        if weight.numel() == 0:
            raise ValueError(f"weight: cannot quantize an empty tensor of shape {list(weight.shape)}")
        if bias is not None:
            _checks.tensor("bias", bias)
            if not bias.dtype.is_floating_point:
                raise TypeError(f"bias: expected a float tensor, got {bias.dtype}")
            if bias.shape != (weight.shape[0],):
                raise ValueError(f"bias: expected shape [{weight.shape[0]}] (out_features), got {list(bias.shape)}")
            if bias.device != weight.device:
                raise ValueError(f"bias: expected a tensor on {weight.device} like weight, got {bias.device}")
        with torch.no_grad():
            packed, state = ops.nf4_quantize(weight.detach(), blocksize, compress_statistics, backend=backend)
        return cls._from_state(packed, state, bias, backend, "weight")

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, blocksize: int = 64, compress_statistics: bool = True, backend: str = "auto"
    ) -> NF4Linear:
        """Quantize an ``nn.Linear``'s weight (and copy its bias); keyword arguments as ``from_weight``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        return cls.from_weight(
            linear.weight, linear.bias, blocksize=blocksize, compress_statistics=compress_statistics, backend=backend
        )

    @classmethod
    def from_bnb(cls, module: nn.Module, *, backend: str = "auto") -> NF4Linear:
        """Adopt a quantized ``bitsandbytes.nn.Linear4bit`` (quant_type "nf4"): its bytes and state, copied as is.

        Nothing is requantized. The layer must already be quantized (bitsandbytes quantizes when the module is
        moved to a device, e.g. ``module.to("cpu")``); ValueError naming ``module`` otherwise, or when its
        quant_type is not "nf4". The bnb module is left unchanged.

        A bitsandbytes layer that has already run an inference forward pass on an AVX512-BF16 CPU has been
        repacked by bitsandbytes into a CPU-only layout, its absmax dequantized and rounded to bfloat16. The codes
        are then restored to the standard layout (losslessly) and the absmax adopted as bitsandbytes now holds it
        (bfloat16 values as float32, not nested): the layer computes with the same numbers as that bnb module.
        """
        packed, state = bnb_nf4_weight(module)
        bias = None if module.bias is None else module.bias.detach()
        return cls._from_state(packed, state, bias, backend, "module")

    # ------------------------------------------------------------------ quantized weight

    @property
    def quant_state(self):
        """A ``bitsandbytes.functional.QuantState`` over this layer's buffers (no copies).

        quant_type "nf4", shape ``(out_features, in_features)``, dtype ``weight_dtype``, ``code`` the NF4 table on
        the buffers' device; when nested, ``state2`` (the 8-bit state of the absmax) and ``offset``.
        """
        bnbf = import_bnb()
        state2 = offset = None
        if self.nested:
            state2 = bnbf.QuantState(
                absmax=self.nested_absmax, code=self.nested_code, blocksize=self.nested_blocksize, dtype=torch.float32
            )
            offset = self.offset
        return bnbf.QuantState(
            absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)), code=self.code,
            blocksize=self.blocksize, quant_type="nf4", dtype=self.weight_dtype, offset=offset, state2=state2,
        )

    def dequantize(self) -> torch.Tensor:
        """The weight ``[out_features, in_features]`` in ``weight_dtype``, bit for bit
        ``bitsandbytes.functional.dequantize_4bit(self.packed, self.quant_state)`` (bitsandbytes' definition)."""
        with torch.no_grad():
            return ops.nf4_dequantize(self.packed, self.quant_state, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` float32/bfloat16/float16 ``[..., in_features]`` -> ``[..., out_features]`` in ``x.dtype``.

        ``x @ dequantize().to(x.dtype)^T + bias.to(x.dtype)``; differentiable in ``x`` only. The dequantized weight
        is what autograd keeps for backward when ``x`` needs a gradient (see the module docstring).
        """
        return ops.nf4_linear(x, self.packed, self.quant_state, self.bias, backend=self.backend)

    # ------------------------------------------------------------------ nn.Module plumbing

    def _apply(self, fn, recurse: bool = True):
        """Move the quantized weight with the module but never change its dtypes (see the module docstring)."""
        before = {name: self._buffers[name] for name in _STATE_BUFFERS if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the bias takes the saved dtype (nothing is lost whatever the fresh layer was built with)
        incoming = state_dict.get(prefix + "bias")
        if self.bias is not None and isinstance(incoming, torch.Tensor) and incoming.dtype.is_floating_point:
            if incoming.dtype != self.bias.dtype:
                self._buffers["bias"] = torch.empty_like(self.bias, dtype=incoming.dtype)
        # load_state_dict would cast silently (float absmax into a uint8 buffer): refuse other dtypes instead
        for name in _STATE_BUFFERS:
            own, key = self._buffers.get(name), prefix + name
            if own is not None and key in state_dict and state_dict[key].dtype != own.dtype:
                error_msgs.append(
                    f"{key}: expected {own.dtype}, got {state_dict[key].dtype}; build the NF4Linear with the "
                    f"configuration it was saved with (nested={self.nested}, blocksize={self.blocksize})"
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"nf4, blocksize={self.blocksize}, nested={self.nested}"
        )

