"""Every op on the GPU backends (cuda, triton on CUDA tensors) against the PyTorch reference.

Skipped without a CUDA device; the CPU backends are covered by test_ops.py and test_nf4.py.
"""

import pytest
import torch

import fastrit
import fastrit.ops as ops
from fastrit.ops import reference
from tests.ops.conftest import DTYPES, assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gpu_backends():
    if not torch.cuda.is_available():
        return []
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        names = []  # the interpreter runs on the CPU; the GPU path needs it off
    else:
        names = ["triton"]
    return names + (["cuda"] if fastrit.backends()["cuda"] == "available" else [])


def r(*shape, dtype):
    return torch.randn(*shape, device="cuda").to(dtype)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("n,i", [(1, 13), (63, 176), (1000, 700)])
def test_ops_on_gpu(backend, n, i, dtype, tol):
    m, h = 3, 24
    base, direction, alphas = r(n, i, dtype=dtype), r(n, i, dtype=dtype), torch.rand(m, device="cuda")
    assert_close(ops.ig_interpolate(base, direction, alphas, backend=backend),
                 reference.ig_interpolate(base, direction, alphas), tol)
    act, grads, weights = r(n, i, dtype=dtype), r(m, n, i, dtype=dtype), torch.rand(m, device="cuda")
    assert_close(ops.ig_accumulate(act, grads, weights, backend=backend),
                 reference.ig_accumulate(act, grads, weights), 1e-5)
    grad_resid, weight_down = r(m, n, h, dtype=dtype), r(h, i, dtype=dtype)
    assert_close(ops.ig_accumulate_linear(act, grad_resid, weight_down, weights, backend=backend),
                 reference.ig_accumulate_linear(act, grad_resid, weight_down, weights), 1e-4)
    keep = torch.arange(i, device="cuda") % 3 != 0
    gate, up = r(n, i, dtype=dtype).requires_grad_(), r(n, i, dtype=dtype).requires_grad_()
    out = ops.swiglu(gate, up, keep, backend=backend)
    grad_out = torch.randn_like(out)
    d_gate, d_up = torch.autograd.grad(out, (gate, up), grad_out)
    want_d_gate, want_d_up = reference.swiglu_backward(grad_out, gate.detach(), up.detach(), keep)
    assert_close(out, reference.swiglu_forward(gate.detach(), up.detach(), keep), tol)
    assert_close(d_gate, want_d_gate, tol)
    assert_close(d_up, want_d_up, tol)
    rows = torch.tensor([i - 1, 0, i // 2], device="cuda")
    x = r(n, 40, dtype=dtype)
    assert_close(ops.row_sparse_grad(act, x, rows, backend=backend), reference.row_sparse_grad(act, x, rows), tol)
    assert_close(ops.col_sparse_grad(x, act, rows, backend=backend), reference.col_sparse_grad(x, act, rows), tol)


@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_nf4_on_gpu_is_bit_exact_with_bitsandbytes(backend, dtype, blocksize):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = r(128, 176, dtype=dtype)
    want_packed, want_state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    packed, state = ops.nf4_quantize(w, blocksize, backend=backend)
    assert torch.equal(packed, want_packed) and torch.equal(state.absmax, want_state.absmax)
    assert torch.equal(ops.nf4_dequantize(want_packed, want_state, backend=backend),
                       bnbf.dequantize_4bit(want_packed, want_state))
