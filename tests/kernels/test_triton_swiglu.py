"""The SwiGLU kernels (fastrit.kernels.swiglu: forward and backward, with and without a kept-neuron mask) against
fastrit.ops.reference.

Devices, dtypes with their tolerances and the odd shapes: tests/kernels/_triton_cases.py.
"""

import pytest
import torch

from fastrit import kernels as K
from fastrit.ops import reference as ref
from tests.kernels import _triton_cases as cases
from tests.kernels._triton_cases import DEVICE, assert_close, forbid_launches, rand

pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []  # on a GPU: part of `make gpu-test`


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _keep(kind: str, i: int) -> torch.Tensor | None:
    """The kept-neuron mask ``[i]`` of ``kind``: none, all, nothing, or random (about 60% kept)."""
    if kind == "none":
        return None
    if kind == "all":
        return torch.ones(i, dtype=torch.bool, device=DEVICE)
    if kind == "nothing":
        return torch.zeros(i, dtype=torch.bool, device=DEVICE)
    return (torch.rand(i) > 0.4).to(DEVICE)


@pytest.mark.parametrize("dtype, atol, rtol", cases.DTYPES)
@pytest.mark.parametrize("keep", ["none", "random"])
@pytest.mark.parametrize("n, i", cases.SHAPES_2D)
def test_swiglu_fwd_bwd(n, i, keep, dtype, atol, rtol):
    gate, up, grad_out = rand(n, i, dtype=dtype, scale=3.0), rand(n, i, dtype=dtype), rand(n, i, dtype=dtype)
    keep = _keep(keep, i)
    assert_close(K.swiglu_fwd(gate, up, keep), ref.swiglu_forward(gate, up, keep), atol, rtol)
    d_gate, d_up = K.swiglu_bwd(grad_out, gate, up, keep)
    want_gate, want_up = ref.swiglu_backward(grad_out, gate, up, keep)
    assert_close(d_gate, want_gate, atol, rtol)
    assert_close(d_up, want_up, atol, rtol)


@pytest.mark.parametrize("keep", ["all", "nothing"])
def test_swiglu_keep_all_or_nothing(keep):
    gate, up, grad_out = rand(7, 13, scale=3.0), rand(7, 13), rand(7, 13)
    mask = _keep(keep, 13)
    out = K.swiglu_fwd(gate, up, mask)
    d_gate, d_up = K.swiglu_bwd(grad_out, gate, up, mask)
    if keep == "nothing":
        assert not out.any() and not d_gate.any() and not d_up.any()
    else:
        assert_close(out, K.swiglu_fwd(gate, up, None), 0, 0)
        assert_close(d_gate, ref.swiglu_backward(grad_out, gate, up)[0], cases.FP32_ATOL, cases.FP32_RTOL)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy, under the interpreter
def test_swiglu_large_magnitudes():
    # saturated sigmoid on both sides (exp overflow to inf must give 0, not NaN)
    gate = torch.tensor([[-100.0, -30.0, -1.0, 0.0, 1.0, 30.0, 100.0]], device=DEVICE)
    up, grad_out = torch.ones_like(gate), torch.ones_like(gate)
    assert_close(K.swiglu_fwd(gate, up), ref.swiglu_forward(gate, up), cases.FP32_ATOL, cases.FP32_RTOL)
    for got, want in zip(K.swiglu_bwd(grad_out, gate, up), ref.swiglu_backward(grad_out, gate, up), strict=True):
        assert_close(got, want, cases.FP32_ATOL, cases.FP32_RTOL)


@pytest.mark.parametrize("n, i", [(0, 13), (7, 0)])
def test_swiglu_empty(n, i, monkeypatch):
    forbid_launches(monkeypatch)
    gate = rand(n, i, dtype=torch.bfloat16)
    keep = torch.ones(i, dtype=torch.bool, device=DEVICE)
    out = K.swiglu_fwd(gate, gate, keep)
    d_gate, d_up = K.swiglu_bwd(gate, gate, gate, keep)
    for t in (out, d_gate, d_up):
        assert t.shape == (n, i) and t.dtype == torch.bfloat16
