"""Every op on the GPU backends (cuda, triton on CUDA tensors) against the PyTorch reference and bitsandbytes'
CUDA kernels, with shapes that reach the faults a small test cannot: inner loops that run more than once,
several tiles, grid-stride loops that wrap, row counts past 65,535 tiles, partial and all-zero NF4 blocks.

Skipped without a CUDA device; run with `make gpu-test` (TRITON_INTERPRET=0). The CPU backends are covered by
test_ops.py and test_nf4.py.
"""

import os

import pytest
import torch

import fastrit
import fastrit.ops as ops
from fastrit.ops import reference
from tests.ops.conftest import DTYPES, assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def gpu_backends():
    if not torch.cuda.is_available():
        return []
    names = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["triton"]  # the GPU path needs it off
    return names + (["cuda"] if fastrit.backends()["cuda"] == "available" else [])


def r(*shape, dtype, device="cuda"):
    return torch.randn(*shape, device=device).to(dtype)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


H = 4096 + 17  # past one BLOCK_H / BLOCK_I tile many times, with a ragged tail


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("n,i", [(1, 13), (63, 176), (1000, H)])
def test_ig_ops_on_gpu(backend, n, i, dtype, tol):
    m = 20
    base, direction, alphas = r(n, i, dtype=dtype), r(n, i, dtype=dtype), torch.rand(m, device="cuda")
    # bit-exact: no FMA contraction, one rounding per multiply and add
    assert torch.equal(ops.ig_interpolate(base, direction, alphas, backend=backend),
                       reference.ig_interpolate(base, direction, alphas))
    act, grads, weights = r(n, i, dtype=dtype), r(m, n, i, dtype=dtype), torch.rand(m, device="cuda")
    assert_close(ops.ig_accumulate(act, grads, weights, backend=backend),
                 reference.ig_accumulate(act, grads, weights), 1e-5)
    grad_resid, weight_down = r(3, n, H, dtype=dtype), r(H, i, dtype=dtype)
    weights3 = weights[:3]
    assert_close(ops.ig_accumulate_linear(act, grad_resid, weight_down, weights3, backend=backend),
                 reference.ig_accumulate_linear(act, grad_resid, weight_down, weights3), 1e-4)


@pytest.mark.parametrize("backend", gpu_backends())
def test_ig_accumulate_linear_more_row_tiles_than_a_grid_axis_holds(backend):
    # 1.1 M rows: more than 65,535 tiles of 16 rows, which an axis other than 0 cannot launch
    n, h, i = 1_100_000, 16, 8
    act, grad_resid = r(n, i, dtype=torch.bfloat16), r(2, n, h, dtype=torch.bfloat16)
    weight_down, weights = r(h, i, dtype=torch.bfloat16), torch.rand(2, device="cuda")
    assert_close(ops.ig_accumulate_linear(act, grad_resid, weight_down, weights, backend=backend),
                 reference.ig_accumulate_linear(act, grad_resid, weight_down, weights), 1e-4)


def swiglu_backward(backend, grad_out, gate, up, keep):
    """The backend's SwiGLU backward called directly: autograd would cast a float32 grad_out to the output's
    dtype before any backward runs, so the mixed-dtype path is only reached this way."""
    if backend == "cuda":
        return torch.ops.fastrit.swiglu_bwd(grad_out, gate, up, keep)
    from fastrit import kernels

    return kernels.swiglu_bwd(grad_out, gate, up, keep)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("keep", ["mask", None])
@pytest.mark.parametrize("n,i", [(1, 13), (1000, H), (70_000, 64)])
def test_swiglu_on_gpu(backend, n, i, keep, dtype, tol):
    keep = torch.arange(i, device="cuda") % 3 != 0 if keep == "mask" else None
    gate, up = r(n, i, dtype=dtype).requires_grad_(), r(n, i, dtype=dtype).requires_grad_()
    out = ops.swiglu(gate, up, keep, backend=backend)
    assert_close(out, reference.swiglu_forward(gate.detach(), up.detach(), keep), tol)
    grad_out = torch.randn_like(out)
    d_gate, d_up = torch.autograd.grad(out, (gate, up), grad_out)
    want_d_gate, want_d_up = reference.swiglu_backward(grad_out, gate.detach(), up.detach(), keep)
    assert_close(d_gate, want_d_gate, tol)
    assert_close(d_up, want_d_up, tol)
    # a float32 gradient of a 16-bit activation (as a float32 loss head gives it)
    grad_out = torch.randn(n, i, device="cuda")
    d_gate, d_up = swiglu_backward(backend, grad_out, gate.detach(), up.detach(), keep)
    want_d_gate, want_d_up = reference.swiglu_backward(grad_out, gate.detach(), up.detach(), keep)
    assert_close(d_gate, want_d_gate, tol)
    assert_close(d_up, want_d_up, tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("k", [3, 300])
@pytest.mark.parametrize("other_dtype", ["same", torch.float32])
def test_sparse_grads_on_gpu(backend, k, other_dtype, dtype, tol):
    n, width, features = 1000, H, 1500
    grad_out = r(n, features, dtype=dtype if other_dtype == "same" else other_dtype)
    x = r(n, width, dtype=dtype)
    rows = torch.randperm(features, device="cuda")[:k]
    assert_close(ops.row_sparse_grad(grad_out, x, rows, backend=backend),
                 reference.row_sparse_grad(grad_out, x, rows), tol)
    cols = torch.randperm(width, device="cuda")[:k]
    assert_close(ops.col_sparse_grad(grad_out, x, cols, backend=backend),
                 reference.col_sparse_grad(grad_out, x, cols), tol)


# ---- NF4: byte for byte with bitsandbytes' CUDA kernels -------------------------------------------------------------


def nf4_weight(dtype, blocksize):
    """2**20 + 37 values (grid-stride loops wrap on an H100; a partial last block): random rows, a zero row, a row
    of subnormals, and the 64 values at which bitsandbytes' CUDA thresholds differ from the float32 midpoints."""
    w = torch.randn(2**20 + 37, device="cuda")
    w[4096:8192] = 0.0  # all-zero blocks at every block size
    w[8192:12288] = 1e-39  # subnormals only: flushed, all-zero blocks
    start = 3 * 4096
    w[start:start + 4096] = 0.0
    bits = torch.tensor([0x3F800000, 0x3DF64863, 0x3F006D04, 0x3F5C89DA, 0xBF591CD8], dtype=torch.int64)
    w[start:start + 5] = bits.to(torch.int32).view(torch.float32).cuda()
    return w.to(dtype)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", gpu_backends())
def test_nf4_quantize_equals_bitsandbytes_cuda(backend, dtype, blocksize, compress):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = nf4_weight(dtype, blocksize)
    want_packed, want_state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=compress,
                                                 quant_type="nf4")
    packed, state = ops.nf4_quantize(w, blocksize, compress, backend=backend)
    assert state.nested == want_state.nested == compress
    assert torch.equal(packed, want_packed), int((packed != want_packed).sum())
    assert torch.equal(state.absmax, want_state.absmax)
    if compress:
        assert torch.equal(state.offset, want_state.offset)
        assert torch.equal(state.state2.absmax, want_state.state2.absmax)
    if dtype == torch.float32:  # the thresholds case (its values round elsewhere in 16 bits): the CUDA codes
        first = (3 * 4096) // 2
        assert packed[first:first + 3, 0].tolist() == [0xF8, 0xDF, 0x17]
    assert packed[4096 // 2:12288 // 2].eq(0).all()  # zero and subnormal blocks: 0x00 bytes
    if not compress:
        assert state.absmax[4096 // blocksize:12288 // blocksize].eq(0).all()
    ours = ops.nf4_dequantize(want_packed, want_state, backend=backend)
    assert torch.equal(ours, bnbf.dequantize_4bit(want_packed, want_state))


@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", gpu_backends())
def test_nf4_nan_and_inf_equal_bitsandbytes_cuda(backend, dtype, blocksize):
    # NaN is ignored by absmax and codes 0; a full block of NaN stores -FLT_MAX, a partial one 0 (its padding);
    # inf makes the reciprocal 0: finite values code 7, inf itself NaN, code 0
    bnbf = pytest.importorskip("bitsandbytes.functional")
    nan, inf = float("nan"), float("inf")
    w = torch.randn(6 * 4096 + 37, device="cuda")
    w[5] = nan
    w[4096:8192] = nan
    w[8192 + 7] = inf
    w[12288 + 9] = -inf
    w[-37:] = nan
    w = w.to(dtype)
    want_packed, want_state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
    packed, state = ops.nf4_quantize(w, blocksize, False, backend=backend)
    assert torch.equal(packed, want_packed), int((packed != want_packed).sum())
    assert torch.equal(state.absmax, want_state.absmax)
    assert state.absmax[4096 // blocksize].item() == -torch.finfo(torch.float32).max
    assert state.absmax[-1].item() == 0.0
    ours = ops.nf4_dequantize(want_packed, want_state, backend=backend)
    assert torch.equal(ours.isnan(), bnbf.dequantize_4bit(want_packed, want_state).isnan())
    assert torch.equal(ours.nan_to_num(), bnbf.dequantize_4bit(want_packed, want_state).nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_nf4_torch_backend_on_cuda_follows_the_cuda_rule(dtype):
    # the reference uses the correctly rounded reciprocal: with power-of-two absmax it is the GPU's too
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(64 * 999 + 10, device="cuda").clamp(-3.9, 3.9)
    w[::64] = 4.0
    w[64:128] = 0.0
    w = w.to(dtype)
    want_packed, want_state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    packed, state = ops.nf4_quantize(w, 64, False, backend="torch")
    assert torch.equal(packed, want_packed) and torch.equal(state.absmax, want_state.absmax)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", gpu_backends())
def test_ops_on_a_device_that_is_not_the_current_one(backend):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    with torch.cuda.device(0):
        dev = "cuda:1"
        base, direction, alphas = r(70, 300, dtype=torch.bfloat16, device=dev), r(70, 300, dtype=torch.bfloat16,
                                                                                   device=dev), torch.rand(5,
                                                                                                           device=dev)
        got = ops.ig_interpolate(base, direction, alphas, backend=backend)
        assert got.device == torch.device(dev) and torch.equal(got, reference.ig_interpolate(base, direction, alphas))
        gate, up = r(70, 300, dtype=torch.bfloat16, device=dev), r(70, 300, dtype=torch.bfloat16, device=dev)
        assert_close(ops.swiglu(gate, up, None, backend=backend), reference.swiglu_forward(gate, up, None), 2e-2)
        w = r(4096, 64, dtype=torch.bfloat16, device=dev)
        packed, state = ops.nf4_quantize(w, 64, False, backend=backend)
        want_packed, _ = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
        assert torch.equal(packed, want_packed)
        assert torch.cuda.current_device() == 0
