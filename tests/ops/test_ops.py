"""Every op on every backend runnable here against an independent float64 oracle (or bitsandbytes)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import fastrit.ops as ops
from tests.ops.conftest import BACKENDS, DTYPES, assert_close

ROWS = (1, 7, 63, 1000)
COLS = (13, 176, 700)
STEPS = (1, 3, 20)
SMALL = {"triton"}  # the Triton interpreter (numpy) is slow: smaller shapes there


def shapes(backend):
    rows = ROWS[:3] if backend in SMALL else ROWS
    cols = COLS[:2] if backend in SMALL else COLS
    return list(itertools.product(rows, cols))


def case():
    """(backend, n, i) for every backend and shape it runs."""
    return [pytest.param(b, n, i, id=f"{b}-{n}x{i}") for b in BACKENDS for n, i in shapes(b)]


def randn(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("backend,n,d", case())
def test_ig_interpolate(backend, n, d, dtype, tol):
    base, direction = randn(n, d, dtype=dtype), randn(n, d, dtype=dtype, seed=1)
    alphas = torch.linspace(0.05, 1, 3)
    got = ops.ig_interpolate(base, direction, alphas, backend=backend)
    want = (base.double()[None] + alphas.double()[:, None, None] * direction.double()[None]).to(dtype)
    assert_close(got, want, tol)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("backend,n,i", case())
def test_ig_accumulate(backend, n, i, dtype, tol, steps):
    act, grads = randn(n, i, dtype=dtype), randn(steps, n, i, dtype=dtype, seed=2)
    weights = torch.rand(steps)
    got = ops.ig_accumulate(act, grads, weights, backend=backend)
    want = (act.double() * sum(weights[k].double() * grads[k].double() for k in range(steps))).float()
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("backend,n,i", case())
def test_ig_accumulate_linear(backend, n, i, dtype, tol, steps):
    hidden = 24
    act, grad_resid = randn(n, i, dtype=dtype), randn(steps, n, hidden, dtype=dtype, seed=3)
    weight_down, weights = randn(hidden, i, dtype=dtype, seed=4), torch.rand(steps)
    got = ops.ig_accumulate_linear(act, grad_resid, weight_down, weights, backend=backend)
    summed = sum(weights[k].double() * grad_resid[k].double() for k in range(steps))
    want = (act.double() * (summed @ weight_down.double())).float()
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ig_accumulate_linear_takes_a_low_precision_weight_with_float32_rows(backend, weight_dtype):
    """As attribution calls it: float32 sites and gradients, the output projection's weight in the model's own dtype;
    the result equals the one with that weight widened to float32 first."""
    act, grad_resid = randn(13, 70), randn(3, 13, 40, seed=3)
    weight_down, weights = randn(40, 70, dtype=weight_dtype, seed=4), torch.rand(3)
    got = ops.ig_accumulate_linear(act, grad_resid, weight_down, weights, backend=backend)
    want = ops.ig_accumulate_linear(act, grad_resid, weight_down.float(), weights, backend=backend)
    assert got.dtype == torch.float32
    assert_close(got, want, 1e-6)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the compiled extension is not built")
@pytest.mark.parametrize("portable", [False, True], ids=["fused", "aten"])
@pytest.mark.parametrize("steps,n,hidden,i", [
    (3, 397, 600, 1000),  # several row blocks, depth blocks (256) and column blocks (768); sum formed first
    (1, 25, 257, 769),    # one step; depth and column tails of one element
    (20, 13, 40, 70),     # small enough to run on one thread
])
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_ig_accumulate_linear_cpu_blocking(monkeypatch, dtype, tol, steps, n, hidden, i, portable):
    """The fused CPU GEMM across its block boundaries, with bf16/fp16 weights read as they are, and
    the portable path (FASTRIT_CPU_GEMM=aten) it falls back to off AVX-512."""
    if portable:
        monkeypatch.setenv("FASTRIT_CPU_GEMM", "aten")
    act, grad_resid = randn(n, i, dtype=dtype), randn(steps, n, hidden, dtype=dtype, seed=3)
    weight_down, weights = randn(hidden, i, dtype=dtype, seed=4), torch.rand(steps)
    got = ops.ig_accumulate_linear(act, grad_resid, weight_down, weights, backend="cpp")
    summed = torch.einsum("k,knh->nh", weights.double(), grad_resid.double())
    assert_close(got, (act.double() * (summed @ weight_down.double())).float(), 1e-5)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("backend,n,i", case())
def test_swiglu_forward_and_gradients(backend, n, i, dtype, tol, masked):
    gate, up = randn(n, i, dtype=dtype), randn(n, i, dtype=dtype, seed=5)
    keep = (torch.arange(i) % 3 != 0) if masked else None
    grad_out = randn(n, i, dtype=dtype, seed=6)
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = ops.swiglu(g, u, keep, backend=backend)
    out.backward(grad_out)
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    want = F.silu(g64) * u64 * (keep.double() if masked else 1.0)
    want.backward(grad_out.double())
    assert_close(out, want.detach().to(dtype), tol)
    assert_close(g.grad, g64.grad.to(dtype), tol)
    assert_close(u.grad, u64.grad.to(dtype), tol)
    if masked:
        assert not out[:, ~keep].any() and not g.grad[:, ~keep].any() and not u.grad[:, ~keep].any()


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("backend,n,o", case())
def test_row_sparse_grad(backend, n, o, dtype, tol):
    grad_out, x = randn(n, o, dtype=dtype), randn(n, 40, dtype=dtype, seed=7)
    rows = torch.tensor([o - 1, 0, o // 2, o - 1])  # unordered, repeated
    got = ops.row_sparse_grad(grad_out, x, rows, backend=backend)
    want = (grad_out.double().t() @ x.double())[rows].to(dtype)
    assert_close(got, want, tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("backend,n,i", case())
def test_col_sparse_grad(backend, n, i, dtype, tol):
    grad_out, h = randn(n, 40, dtype=dtype), randn(n, i, dtype=dtype, seed=8)
    cols = torch.tensor([i - 1, 3 % i, 0, i // 2])
    got = ops.col_sparse_grad(grad_out, h, cols, backend=backend)
    want = (grad_out.double().t() @ h.double())[:, cols].to(dtype)
    assert_close(got, want, tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    empty = torch.zeros(0, 13)
    assert ops.ig_interpolate(empty, empty, torch.rand(3), backend=backend).shape == (3, 0, 13)
    assert ops.ig_accumulate(empty, torch.zeros(3, 0, 13), torch.rand(3), backend=backend).shape == (0, 13)
    assert ops.ig_accumulate_linear(
        empty, torch.zeros(3, 0, 5), torch.rand(5, 13), torch.rand(3), backend=backend
    ).shape == (0, 13)
    assert ops.swiglu(empty, empty, backend=backend).shape == (0, 13)
    assert ops.row_sparse_grad(torch.rand(4, 13), torch.rand(4, 6), torch.zeros(0, dtype=torch.long),
                               backend=backend).shape == (0, 6)
    assert ops.col_sparse_grad(torch.rand(4, 6), torch.rand(4, 13), torch.zeros(0, dtype=torch.long),
                               backend=backend).shape == (6, 0)
    zero_rows = ops.row_sparse_grad(torch.rand(0, 13), torch.rand(0, 6), torch.tensor([1, 2]), backend=backend)
    assert torch.equal(zero_rows, torch.zeros(2, 6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    gate = randn(13, 32)[:, ::2]  # [13, 16], stride 2
    up = randn(16, 13, seed=9).t()  # [13, 16], transposed
    out = ops.swiglu(gate, up, backend=backend)
    assert_close(out, (F.silu(gate.double()) * up.double()).float(), 1e-5)
    act = randn(16, 13).t()
    grads = randn(3, 16, 13, seed=10).transpose(1, 2)
    got = ops.ig_accumulate(act, grads, torch.ones(3), backend=backend)
    assert_close(got, (act.double() * grads.double().sum(0)).float(), 1e-5)
