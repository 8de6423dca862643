"""Neuron-masked SwiGLU, ``silu(gate) * up * keep``, with a one-pass fused backward."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _checks, reference
from ._backend import chosen, compiled_op, triton_kernels

__all__ = ["swiglu"]


class _SwiGLU(torch.autograd.Function):
    """Forward/backward through a backend's pair of kernels (torch reference or Triton)."""

    @staticmethod
    def forward(ctx, gate, up, keep, forward: Callable, backward: Callable):  # noqa: D102
        ctx.save_for_backward(gate, up, keep)
        ctx.backward_kernel = backward
        return forward(gate, up, keep)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        gate, up, keep = ctx.saved_tensors
        d_gate, d_up = ctx.backward_kernel(grad_out.contiguous(), gate, up, keep)
        return d_gate, d_up, None, None, None


def swiglu(
    gate: torch.Tensor, up: torch.Tensor, keep: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """``[N, I]`` in ``gate.dtype``: ``silu(gate) * up * keep``, differentiable in ``gate`` and ``up``.

    Args:
        gate: ``[N, I]`` float32/bfloat16/float16, the gate projection's output.
        up: ``[N, I]``, same dtype, the up projection's output.
        keep: ``[I]`` bool neuron mask (False = deactivated neuron, output 0); None keeps all.

    The backward computes ``d_gate`` and ``d_up`` in one pass from the saved inputs.
    """
    _checks.floating("gate", gate, 2)
    _checks.floating("up", up, 2)
    if up.shape != gate.shape or up.dtype != gate.dtype:
        raise ValueError(
            f"up: expected shape {list(gate.shape)} and dtype {gate.dtype} like gate, got {list(up.shape)} {up.dtype}"
        )
    keep = _checks.keep_mask(keep, gate.shape[1])
    device = _checks.same_device(gate=gate, up=up, keep=keep)
    gate, up = gate.contiguous(), up.contiguous()
    keep = keep.contiguous() if keep is not None else None
    name = chosen(backend, device)
    if name in ("cpp", "cuda"):
        return compiled_op("swiglu_fwd")(gate, up, keep)  # autograd registered in fastrit.ops._library
    if name == "triton":
        kernels = triton_kernels()
        return _SwiGLU.apply(gate, up, keep, kernels.swiglu_fwd, kernels.swiglu_bwd)
    return _SwiGLU.apply(gate, up, keep, reference.swiglu_forward, reference.swiglu_backward)
