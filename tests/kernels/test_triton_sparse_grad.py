"""The sparse weight-gradient kernels (fastrit.kernels.sparse_grad: rows of a linear layer's weight, columns of
another's) against fastrit.ops.reference.

Devices, dtypes with their tolerances and the odd shapes: tests/kernels/_triton_cases.py.
"""

import pytest
import torch

from fastrit import kernels as K
from fastrit.ops import reference as ref
from tests.kernels import _triton_cases as cases
from tests.kernels._triton_cases import DEVICE, assert_close, forbid_launches, rand

pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []  # on a GPU: part of `make gpu-test`

#: ``side -> (kernel launcher, reference)``: "row" indexes the output rows of ``grad_out [N, O]`` and multiplies by
#: ``x [N, In]``; "col" indexes the columns of ``h [N, I]`` and multiplies by ``grad_out [N, H]``
SIDES = {
    "row": (K.row_sparse_grad_fwd, ref.row_sparse_grad),
    "col": (K.col_sparse_grad_fwd, ref.col_sparse_grad),
}
#: ``(n, indexed, other, k)``: tokens, the width the ``k`` indices pick from, the other operand's width
SHAPES = [(1, 13, 176, 1), (7, 176, 13, 5), (63, 13, 176, 13), (63, 176, 40, 37)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _indices(k: int, size: int) -> torch.Tensor:
    """``k`` int64 indices in ``[0, size)``: unsorted, and from three on with a repeat and touching both ends."""
    idx = torch.randperm(size)[:k]
    if k >= 3:
        idx[0], idx[1], idx[2] = size - 1, 0, idx[-1]
    return idx.to(DEVICE)


def _operands(side: str, n: int, indexed: int, other: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_out, x or h)`` of ``side``: the indexed width is grad_out's for "row", h's for "col"."""
    if side == "row":
        return rand(n, indexed, dtype=dtype), rand(n, other, dtype=dtype)
    return rand(n, other, dtype=dtype), rand(n, indexed, dtype=dtype)


@pytest.mark.parametrize("dtype, atol, rtol", cases.DTYPES)
@pytest.mark.parametrize("n, indexed, other, k", SHAPES)
@pytest.mark.parametrize("side", SIDES)
def test_sparse_grad(side, n, indexed, other, k, dtype, atol, rtol):
    kernel, reference = SIDES[side]
    grad_out, operand = _operands(side, n, indexed, other, dtype)
    index = _indices(k, indexed)
    assert_close(kernel(grad_out, operand, index), reference(grad_out, operand, index), atol, rtol)


def test_sparse_grad_mixed_dtypes():
    grad_out, x = rand(7, 13, dtype=torch.float32), rand(7, 20, dtype=torch.bfloat16)
    rows = _indices(5, 13)
    want = ref.row_sparse_grad(grad_out, x, rows)
    assert_close(K.row_sparse_grad_fwd(grad_out, x, rows), want, cases.BF16_ATOL, cases.BF16_RTOL)
    cols = _indices(5, 20)
    want = ref.col_sparse_grad(grad_out, x, cols)
    assert_close(K.col_sparse_grad_fwd(grad_out, x, cols), want, cases.BF16_ATOL, cases.BF16_RTOL)


def test_sparse_grad_no_tokens_gives_zeros():
    got = K.row_sparse_grad_fwd(rand(0, 13), rand(0, 20), _indices(4, 13))
    assert got.shape == (4, 20) and not got.any()
    got = K.col_sparse_grad_fwd(rand(0, 13), rand(0, 20), _indices(4, 20))
    assert got.shape == (13, 4) and not got.any()


def test_sparse_grad_empty(monkeypatch):
    forbid_launches(monkeypatch)
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    got = K.row_sparse_grad_fwd(rand(7, 13), rand(7, 20, dtype=torch.float16), empty)
    assert got.shape == (0, 20) and got.dtype == torch.float16
    got = K.row_sparse_grad_fwd(rand(7, 13), rand(7, 0), _indices(3, 13))
    assert got.shape == (3, 0)
    got = K.col_sparse_grad_fwd(rand(7, 13), rand(7, 20, dtype=torch.bfloat16), empty)
    assert got.shape == (13, 0) and got.dtype == torch.bfloat16
    got = K.col_sparse_grad_fwd(rand(7, 0), rand(7, 20), _indices(3, 20))
    assert got.shape == (0, 3)
