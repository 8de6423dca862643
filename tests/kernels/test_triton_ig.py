"""The IG kernels (fastrit.kernels.ig: interpolate, accumulate, accumulate_linear) against fastrit.ops.reference.

Devices, dtypes with their tolerances and the odd shapes: tests/kernels/_triton_cases.py.
"""

import pytest
import torch

from fastrit import kernels as K
from fastrit.ops import reference as ref
from tests.kernels import _triton_cases as cases
from tests.kernels._triton_cases import DEVICE, assert_close, forbid_launches, rand

pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []  # on a GPU: part of `make gpu-test`

#: ``(m, n, h, i)``: steps, rows, hidden (the summed axis: one tile, a ragged one, several) and neurons
LINEAR_SHAPES = [(1, 1, 13, 176), (3, 7, 40, 13), (20, 7, 13, 176), (3, 63, 176, 13), (20, 63, 40, 176)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype, atol, rtol", cases.DTYPES)
@pytest.mark.parametrize("m", cases.STEPS)
@pytest.mark.parametrize("n, d", cases.SHAPES_2D_SMALL)
def test_ig_interpolate(n, d, m, dtype, atol, rtol):
    base, direction = rand(n, d, dtype=dtype), rand(n, d, dtype=dtype)
    alphas = torch.rand(m, device=DEVICE)
    got = K.ig_interpolate_fwd(base, direction, alphas)
    want = ref.ig_interpolate(base, direction, alphas)
    assert_close(got, want, atol, rtol)
    # the same float32 multiply and add (no FMA), then round-to-nearest-even: bit-exact, bf16 included
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", cases.INPUT_DTYPES)
@pytest.mark.parametrize("m", cases.STEPS)
@pytest.mark.parametrize("n, i", cases.SHAPES_2D)
def test_ig_accumulate(n, i, m, dtype):
    act, grads = rand(n, i, dtype=dtype), rand(m, n, i, dtype=dtype)
    weights = torch.rand(m, device=DEVICE) - 0.25
    got = K.ig_accumulate_fwd(act, grads, weights)
    # a float32 output: float32's tolerance whatever the input dtype (every input is exact in float32)
    assert_close(got, ref.ig_accumulate(act, grads, weights), cases.FP32_ATOL, cases.FP32_RTOL)


@pytest.mark.parametrize("dtype", cases.INPUT_DTYPES)
@pytest.mark.parametrize("m, n, h, i", LINEAR_SHAPES)
def test_ig_accumulate_linear(m, n, h, i, dtype):
    act, grad_resid, weight_down = rand(n, i, dtype=dtype), rand(m, n, h, dtype=dtype), rand(h, i, dtype=dtype)
    weights = torch.rand(m, device=DEVICE)
    got = K.ig_accumulate_linear_fwd(act, grad_resid, weight_down, weights)
    want = ref.ig_accumulate_linear(act, grad_resid, weight_down, weights)
    # float32 output; the sums over m and over H run in another order than torch's einsum/matmul
    assert_close(got, want, 2e-5, 2e-5)


@pytest.mark.parametrize("n, d, m", [(0, 13, 3), (7, 0, 3), (7, 13, 0)])
def test_ig_interpolate_empty(n, d, m, monkeypatch):
    forbid_launches(monkeypatch)
    base = rand(n, d)
    got = K.ig_interpolate_fwd(base, base, torch.rand(m, device=DEVICE))
    assert got.shape == (m, n, d) and got.dtype == base.dtype


@pytest.mark.parametrize("n, i", [(0, 13), (7, 0)])
def test_ig_accumulate_empty(n, i, monkeypatch):
    forbid_launches(monkeypatch)
    got = K.ig_accumulate_fwd(rand(n, i, dtype=torch.bfloat16), rand(3, n, i), torch.rand(3, device=DEVICE))
    assert got.shape == (n, i) and got.dtype == torch.float32
    got = K.ig_accumulate_linear_fwd(rand(n, i), rand(3, n, 5), rand(5, i), torch.rand(3, device=DEVICE))
    assert got.shape == (n, i) and got.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ig_no_steps_or_no_hidden_gives_zeros(dtype):
    act = rand(7, 13, dtype=dtype)
    weights = torch.rand(0, device=DEVICE)
    got = K.ig_accumulate_fwd(act, rand(0, 7, 13, dtype=dtype), weights)
    assert_close(got, ref.ig_accumulate(act, rand(0, 7, 13, dtype=dtype), weights), cases.FP32_ATOL, cases.FP32_RTOL)
    assert not got.any()
    got = K.ig_accumulate_linear_fwd(act, rand(0, 7, 5, dtype=dtype), rand(5, 13, dtype=dtype), weights)
    assert got.shape == (7, 13) and not got.any()
    w3 = torch.rand(3, device=DEVICE)
    got = K.ig_accumulate_linear_fwd(act, rand(3, 7, 0, dtype=dtype), rand(0, 13, dtype=dtype), w3)
    assert got.shape == (7, 13) and not got.any()
