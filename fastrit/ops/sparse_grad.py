"""Weight gradients for chosen neurons only: rows of gate/up projections, columns of down_proj."""

from __future__ import annotations

import torch

from . import _checks, reference
from ._backend import dispatch

__all__ = ["row_sparse_grad", "col_sparse_grad"]


def row_sparse_grad(
    grad_out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """``[k, In]`` in ``x.dtype``: ``grad_out[:, rows]^T @ x`` with float32 accumulation.

    The gradient of a linear layer's weight ``[O, In]`` restricted to output rows ``rows``.

    Args:
        grad_out: ``[N, O]`` gradient of the layer's output.
        x: ``[N, In]`` the layer's input.
        rows: ``[k]`` int64 in ``[0, O)``.
    """
    _checks.floating("grad_out", grad_out, 2)
    _checks.floating("x", x, 2)
    _checks.size("x", x, 0, grad_out.shape[0], "N, like grad_out")
    _checks.index("rows", rows, grad_out.shape[1])
    device = _checks.same_device(grad_out=grad_out, x=x, rows=rows)
    args = (grad_out.contiguous(), x.contiguous(), rows.contiguous())
    return dispatch("row_sparse_grad", backend, device, reference.row_sparse_grad, *args)


def col_sparse_grad(
    grad_out: torch.Tensor, h: torch.Tensor, cols: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """``[H, k]`` in ``h.dtype``: ``grad_out^T @ h[:, cols]`` with float32 accumulation.

    The gradient of a linear layer's weight ``[H, I]`` restricted to input columns ``cols``.

    Args:
        grad_out: ``[N, H]`` gradient of the layer's output.
        h: ``[N, I]`` the layer's input (the neuron site).
        cols: ``[k]`` int64 in ``[0, I)``.
    """
    _checks.floating("grad_out", grad_out, 2)
    _checks.floating("h", h, 2)
    _checks.size("h", h, 0, grad_out.shape[0], "N, like grad_out")
    _checks.index("cols", cols, h.shape[1])
    device = _checks.same_device(grad_out=grad_out, h=h, cols=cols)
    args = (grad_out.contiguous(), h.contiguous(), cols.contiguous())
    return dispatch("col_sparse_grad", backend, device, reference.col_sparse_grad, *args)
