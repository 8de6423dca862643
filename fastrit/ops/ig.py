"""IG interpolation and accumulation ops: the fused kernels behind attribution.

Each public function checks its arguments (ValueError/TypeError naming the argument, the same for
every backend) and runs on ``backend`` ("auto" | "torch" | "triton" | "cpp" | "cuda").
"""

from __future__ import annotations

import torch

from . import _checks, reference
from ._backend import dispatch

__all__ = ["ig_interpolate", "ig_accumulate", "ig_accumulate_linear"]


def ig_interpolate(
    base: torch.Tensor, direction: torch.Tensor, alphas: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """``[m, N, D]``: ``base + alphas[k] * direction`` in ``base.dtype``, computed in float32.

    Args:
        base: ``[N, D]`` float32/bfloat16/float16.
        direction: ``[N, D]``, same dtype as ``base``.
        alphas: ``[m]`` float.
    """
    _checks.floating("base", base, 2)
    _checks.floating("direction", direction, 2)
    if direction.shape != base.shape or direction.dtype != base.dtype:
        raise ValueError(
            f"direction: expected shape {list(base.shape)} and dtype {base.dtype} like base, "
            f"got {list(direction.shape)} {direction.dtype}"
        )
    alphas = _checks.weights("alphas", alphas, _checks.tensor("alphas", alphas).numel())
    device = _checks.same_device(base=base, direction=direction, alphas=alphas)
    args = (base.contiguous(), direction.contiguous(), alphas.contiguous())
    return dispatch("ig_interpolate", backend, device, reference.ig_interpolate, *args)


def ig_accumulate(
    act: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """``[N, I]`` float32: ``act * sum_k weights[k] * grads[k]``.

    Args:
        act: ``[N, I]`` activations at the end point.
        grads: ``[m, N, I]`` gradients at the ``m`` integration points.
        weights: ``[m]`` integration weights.
    """
    _checks.floating("act", act, 2)
    _checks.floating("grads", grads, 3)
    _checks.size("grads", grads, 1, act.shape[0], "N, like act")
    _checks.size("grads", grads, 2, act.shape[1], "I, like act")
    weights = _checks.weights("weights", weights, grads.shape[0])
    device = _checks.same_device(act=act, grads=grads, weights=weights)
    args = (act.contiguous(), grads.contiguous(), weights.contiguous())
    return dispatch("ig_accumulate", backend, device, reference.ig_accumulate, *args)


def ig_accumulate_linear(
    act: torch.Tensor,
    grad_resid: torch.Tensor,
    weight_down: torch.Tensor,
    weights: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``[N, I]`` float32: ``act * ((sum_k weights[k] * grad_resid[k]) @ weight_down)``.

    The neuron IG straight from residual-stream gradients, never forming ``[m, N, I]``.

    Args:
        act: ``[N, I]`` site activations.
        grad_resid: ``[m, N, H]`` gradients of the output projection's output.
        weight_down: ``[H, I]`` the output projection's weight.
        weights: ``[m]`` integration weights.
    """
    _checks.floating("act", act, 2)
    _checks.floating("grad_resid", grad_resid, 3)
    _checks.floating("weight_down", weight_down, 2)
    _checks.size("grad_resid", grad_resid, 1, act.shape[0], "N, like act")
    _checks.size("weight_down", weight_down, 0, grad_resid.shape[2], "H, like grad_resid")
    _checks.size("weight_down", weight_down, 1, act.shape[1], "I, like act")
    weights = _checks.weights("weights", weights, grad_resid.shape[0])
    device = _checks.same_device(act=act, grad_resid=grad_resid, weight_down=weight_down, weights=weights)
    args = (act.contiguous(), grad_resid.contiguous(), weight_down.contiguous(), weights.contiguous())
    return dispatch("ig_accumulate_linear", backend, device, reference.ig_accumulate_linear, *args)
