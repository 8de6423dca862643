"""Every op on the GPU backends (cuda, triton on CUDA tensors) against the PyTorch reference and bitsandbytes'
CUDA kernels, with shapes that reach the faults a small test cannot: inner loops that run more than once,
several tiles, grid-stride loops that wrap, row counts past 65,535 tiles, partial and all-zero NF4 blocks,
tensors of more than 2**31 elements, and ops run on a CUDA stream other than the default one.

Element-wise comparisons (tests/kernels/test_triton_autotune_configs.py defines the bounds): SwiGLU within a few
float32 ulps plus one ulp of a 16-bit output (``swiglu_bounds``); IG interpolation and NF4 bit for bit; the sums of
products (IG accumulation, the sparse gradients) within the float32 dot-product bound ``sum_bound`` at every element,
beside the older check relative to the largest output.

Skipped without a CUDA device; run with `make gpu-test` (TRITON_INTERPRET=0). The CPU backends are covered by
test_ops.py and test_nf4.py.
"""

import os

import pytest
import torch

import fastrit
import fastrit.ops as ops
from fastrit.ops import reference
from tests.kernels.test_triton_autotune_configs import assert_within, out_ulps, sum_bound, swiglu_bounds
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
def _seed_and_full_precision():
    torch.manual_seed(0)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # float32 GEMMs without TF32, on both sides of every comparison
    yield
    torch.set_float32_matmul_precision(precision)


def weighted_magnitude(grads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_k |weights[k]| * |grads[k]|`` in float64: the magnitude the IG sums' rounding errors are bounded by."""
    return torch.einsum("k,kni->ni", weights.double().abs(), grads.double().abs())


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
    got, want = ops.ig_accumulate(act, grads, weights, backend=backend), reference.ig_accumulate(act, grads, weights)
    assert_close(got, want, 1e-5)
    assert_within(got, want, sum_bound(m, act.double().abs() * weighted_magnitude(grads, weights)),
                  "ig_accumulate", 0)
    grad_resid, weight_down = r(3, n, H, dtype=dtype), r(H, i, dtype=dtype)
    weights3 = weights[:3]
    got = ops.ig_accumulate_linear(act, grad_resid, weight_down, weights3, backend=backend)
    want = reference.ig_accumulate_linear(act, grad_resid, weight_down, weights3)
    assert_close(got, want, 1e-4)
    magnitude = act.double().abs() * (weighted_magnitude(grad_resid, weights3) @ weight_down.double().abs())
    assert_within(got, want, sum_bound(3 + H, magnitude), "ig_accumulate_linear", 0)


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


def assert_swiglu_within_ulps(backend, gate, up, keep, out=None, grads=None, grad_out=None, what=""):
    """``out`` (the forward) and ``grads`` (``d_gate, d_up`` for ``grad_out``) against the reference, element by element
    within :func:`swiglu_bounds` (a few float32 ulps, one ulp of a 16-bit output)."""
    bounds = swiglu_bounds(gate, up, grad_out, keep)
    ulps = out_ulps(gate.dtype)
    if out is not None:
        want = reference.swiglu_forward(gate, up, keep)
        assert_within(out, want, bounds["forward"], f"{backend} forward{what}", ulps)
    if grads is not None:
        want_d_gate, want_d_up = reference.swiglu_backward(grad_out, gate, up, keep)
        assert_within(grads[0], want_d_gate, bounds["d_gate"], f"{backend} d_gate{what}", ulps)
        assert_within(grads[1], want_d_up, bounds["d_up"], f"{backend} d_up{what}", ulps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("keep", ["mask", None])
@pytest.mark.parametrize("n,i", [(1, 13), (1000, H), (70_000, 64)])
def test_swiglu_on_gpu(backend, n, i, keep, dtype):
    """Forward, backward through autograd, and the backward with a float32 gradient of 16-bit activations: every
    element within a few float32 ulps of the reference plus one ulp of the output dtype (``swiglu_bounds``)."""
    keep = torch.arange(i, device="cuda") % 3 != 0 if keep == "mask" else None
    gate, up = (r(n, i, dtype=dtype) * 3).requires_grad_(), r(n, i, dtype=dtype).requires_grad_()
    out = ops.swiglu(gate, up, keep, backend=backend)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (gate, up), grad_out)
    gate, up = gate.detach(), up.detach()
    assert_swiglu_within_ulps(backend, gate, up, keep, out, grads, grad_out)
    # a float32 gradient of a 16-bit activation (as a float32 loss head gives it)
    grad_out = torch.randn(n, i, device="cuda")
    grads = swiglu_backward(backend, grad_out, gate, up, keep)
    assert_swiglu_within_ulps(backend, gate, up, keep, grads=grads, grad_out=grad_out, what=" (float32 gradient)")


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("k", [3, 300])
@pytest.mark.parametrize("other_dtype", ["same", torch.float32])
def test_sparse_grads_on_gpu(backend, k, other_dtype, dtype, tol):
    n, width, features = 1000, H, 1500
    grad_out = r(n, features, dtype=dtype if other_dtype == "same" else other_dtype)
    x = r(n, width, dtype=dtype)
    rows = torch.randperm(features, device="cuda")[:k]
    got, want = ops.row_sparse_grad(grad_out, x, rows, backend=backend), reference.row_sparse_grad(grad_out, x, rows)
    assert_close(got, want, tol)
    magnitude = grad_out.double().abs()[:, rows].t() @ x.double().abs()
    assert_within(got, want, sum_bound(n, magnitude), "row_sparse_grad", out_ulps(dtype))
    cols = torch.randperm(width, device="cuda")[:k]
    got, want = ops.col_sparse_grad(grad_out, x, cols, backend=backend), reference.col_sparse_grad(grad_out, x, cols)
    assert_close(got, want, tol)
    magnitude = grad_out.double().abs().t() @ x.double().abs()[:, cols]
    assert_within(got, want, sum_bound(n, magnitude), "col_sparse_grad", out_ulps(dtype))


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
        assert_swiglu_within_ulps(backend, gate, up, None, ops.swiglu(gate, up, None, backend=backend))
        w = r(4096, 64, dtype=torch.bfloat16, device=dev)
        packed, state = ops.nf4_quantize(w, 64, False, backend=backend)
        want_packed, _ = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
        assert torch.equal(packed, want_packed)
        assert torch.cuda.current_device() == 0


# ---- a CUDA stream other than the default one -----------------------------------------------------------------------

#: GPU clock cycles the side stream spins before it writes the inputs (tens of milliseconds on any current GPU)
SLEEP_CYCLES = 2**26


def sentinel_like(x: torch.Tensor) -> torch.Tensor:
    """A tensor like ``x`` holding other values than ``x`` (NaN; the complement of bytes and masks; index 0, which
    any index tensor may hold and which stays in range)."""
    if x.dtype.is_floating_point:
        return torch.full_like(x, float("nan"))
    if x.dtype in (torch.bool, torch.uint8):
        return ~x
    return torch.zeros_like(x)


def on_side_stream(fn, inputs: tuple[torch.Tensor, ...]):
    """``fn`` on copies of ``inputs``, run on a new CUDA stream that first spins for :data:`SLEEP_CYCLES` and only then
    writes the copies (until then they hold :func:`sentinel_like` values). A kernel that ``fn`` launched on the
    default stream instead of the current one runs at once, before its inputs are written, and reads the sentinels."""
    side = torch.cuda.Stream()
    copies = [sentinel_like(x) for x in inputs]
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        assert torch.cuda.current_stream() == side
        torch.cuda._sleep(SLEEP_CYCLES)
        for copy, x in zip(copies, inputs, strict=True):
            copy.copy_(x)
        out = fn(*copies)
    torch.cuda.synchronize()
    return out


def as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def stream_cases(backend):
    """``name -> (fn, inputs, check)`` for every op; ``check(got)`` compares an output computed from ``inputs`` with
    what the op computed on the default stream: bit for bit, except where the cuda backend calls cuBLAS (whose choice
    of algorithm may depend on the stream), within the dot-product bound of the reference."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    bf16 = torch.bfloat16
    n, i, h, m = 300, 1000, 257, 5
    base, direction, alphas = r(n, i, dtype=bf16), r(n, i, dtype=bf16), torch.rand(m, device="cuda")
    act, grads, weights = r(n, i, dtype=bf16), r(m, n, i, dtype=bf16), torch.rand(m, device="cuda")
    grad_resid, weight_down = r(m, n, h, dtype=bf16), r(h, i, dtype=bf16)
    gate, up, grad_out = r(n, i, dtype=bf16) * 3, r(n, i, dtype=bf16), r(n, i, dtype=bf16)
    keep = torch.arange(i, device="cuda") % 3 != 0
    rows, cols = torch.randperm(i, device="cuda")[:77], torch.randperm(i, device="cuda")[:77]
    w = r(257, 64, dtype=bf16)
    packed, state = ops.nf4_quantize(w, 64, False, backend=backend)

    def quantize(x):
        codes, quant_state = ops.nf4_quantize(x, 64, False, backend=backend)
        return codes, quant_state.absmax

    def dequantize(p, absmax):
        quant_state = bnbf.QuantState(absmax=absmax, shape=state.shape, dtype=state.dtype, blocksize=64,
                                      code=state.code, quant_type="nf4")
        return ops.nf4_dequantize(p, quant_state, backend=backend)

    def near_reference(want, magnitude, terms, what):
        return lambda got: assert_within(got[0], want, sum_bound(terms, magnitude), what, out_ulps(want.dtype))

    cases = {
        "ig_interpolate": (lambda *a: ops.ig_interpolate(*a, backend=backend), (base, direction, alphas)),
        "ig_accumulate": (lambda *a: ops.ig_accumulate(*a, backend=backend), (act, grads, weights)),
        "ig_accumulate_linear": (lambda *a: ops.ig_accumulate_linear(*a, backend=backend),
                                 (act, grad_resid, weight_down, weights)),
        "swiglu": (lambda *a: ops.swiglu(*a, backend=backend), (gate, up, keep)),
        "swiglu_backward": (lambda *a: swiglu_backward(backend, *a), (grad_out, gate, up, keep)),
        "row_sparse_grad": (lambda *a: ops.row_sparse_grad(*a, backend=backend), (grad_out, up, rows)),
        "col_sparse_grad": (lambda *a: ops.col_sparse_grad(*a, backend=backend), (grad_out, up, cols)),
        "nf4_quantize": (quantize, (w,)),
        "nf4_dequantize": (dequantize, (packed, state.absmax)),
    }
    out = {}
    for name, (fn, inputs) in cases.items():
        want = as_tuple(fn(*inputs))  # on the default stream

        def exact(got, want=want, name=name):
            for g, w_ in zip(got, want, strict=True):
                assert torch.equal(g, w_), f"{backend} {name}: differs from the default stream's result"

        out[name] = (fn, inputs, exact)
    if backend == "cuda":  # at::mm inside
        out["ig_accumulate_linear"] = (*out["ig_accumulate_linear"][:2], near_reference(
            reference.ig_accumulate_linear(act, grad_resid, weight_down, weights),
            act.double().abs() * (weighted_magnitude(grad_resid, weights) @ weight_down.double().abs()), m + h,
            "cuda ig_accumulate_linear"))
        out["row_sparse_grad"] = (*out["row_sparse_grad"][:2], near_reference(
            reference.row_sparse_grad(grad_out, up, rows), grad_out.double().abs()[:, rows].t() @ up.double().abs(),
            n, "cuda row_sparse_grad"))
        out["col_sparse_grad"] = (*out["col_sparse_grad"][:2], near_reference(
            reference.col_sparse_grad(grad_out, up, cols), grad_out.double().abs().t() @ up.double().abs()[:, cols],
            n, "cuda col_sparse_grad"))
    return out


@pytest.mark.parametrize("backend", gpu_backends())
def test_ops_on_a_non_default_stream(backend):
    """Every op run on a new CUDA stream, with its inputs written on that stream after a delay, gives the default
    stream's result: its kernels are launched on the current stream (a kernel on the default stream would read the
    NaN / complemented sentinels the inputs hold until then) and its outputs are complete when that stream is."""
    cases = stream_cases(backend)
    for name, (fn, inputs, check) in cases.items():
        got = as_tuple(on_side_stream(fn, inputs))
        assert all(g.device.type == "cuda" for g in got), name
        check(got)


# ---- tensors past 2**31 elements ------------------------------------------------------------------------------------

BIG = 2**31


def need_free_memory(nbytes: int) -> None:
    """Skip, saying why, unless the current CUDA device has ``nbytes`` free (plus 1 GiB for everything else)."""
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    if free < nbytes + 2**30:
        pytest.skip(f"needs {(nbytes + 2**30) / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free "
                    f"of {total / 2**30:.1f} GiB")


def _row_spans(rows: int, inter: int) -> list[slice]:
    """Rows at the start, around the row holding element 2**31, and at the end."""
    middle = BIG // inter
    return [slice(0, 2), slice(middle - 1, middle + 2), slice(rows - 2, rows)]


@pytest.mark.parametrize("backend", gpu_backends())
def test_swiglu_past_2_31_elements(backend):
    """SwiGLU forward and backward on ``[149,797, 14,336]`` bfloat16 (2**31 + 6,144 elements; element 2**31 in the
    middle of a row): the rows at the start, around element 2**31 and at the end within ``swiglu_bounds`` of the
    reference computed on those rows alone (a 32-bit offset would write them elsewhere, or fault)."""
    inter = 14336
    rows = BIG // inter + 1
    assert rows * inter > BIG
    element = 2  # bytes
    need_free_memory(5 * rows * inter * element)  # gate, up and out; then grad_out, d_gate and d_up with out freed
    gate = torch.randn(rows, inter, device="cuda", dtype=torch.bfloat16)
    up = torch.randn(rows, inter, device="cuda", dtype=torch.bfloat16)
    keep = torch.arange(inter, device="cuda") % 5 != 0
    out = ops.swiglu(gate, up, keep, backend=backend)
    spans = _row_spans(rows, inter)
    for span in spans:
        assert_swiglu_within_ulps(backend, gate[span], up[span], keep, out[span], what=f" rows {span}")
    del out
    grad_out = torch.randn(rows, inter, device="cuda", dtype=torch.bfloat16)
    grads = swiglu_backward(backend, grad_out, gate, up, keep)
    for span in spans:
        assert_swiglu_within_ulps(backend, gate[span], up[span], keep, grads=(grads[0][span], grads[1][span]),
                                  grad_out=grad_out[span], what=f" rows {span}")


@pytest.mark.parametrize("backend", gpu_backends())
def test_nf4_past_2_31_elements(backend):
    """NF4 quantize and dequantize of 2**31 + 6,437 bfloat16 values (blocks of 64; the last one partial, an odd count):
    codes, absmax and dequantized values at the start, around element 2**31 and at the end equal, bit for bit, the
    reference computed on those blocks alone. Every block's largest magnitude is 1.0, so the CUDA kernels' approximate
    reciprocal is exact there and the reference's rule "cuda" is theirs."""
    blocksize = 64
    numel = BIG + 100 * blocksize + 37
    need_free_memory(numel * 2 + (numel + 1) // 2 + 4 * (numel // blocksize + 1) + numel * 2)
    w = torch.empty(numel, device="cuda", dtype=torch.bfloat16).uniform_(-0.99, 0.99)
    w[::blocksize] = 1.0
    packed, state = ops.nf4_quantize(w, blocksize, False, backend=backend)
    absmax = state.absmax
    tail = numel - numel % blocksize
    spans = [(0, 8192), (BIG - 4096, BIG + 4096), (tail - 4096, numel)]
    for start, stop in spans:  # starts on block boundaries
        want_packed, want_absmax = reference.nf4_quantize_blocks(w[start:stop], blocksize, "cuda")
        assert torch.equal(packed[start // 2:(stop + 1) // 2], want_packed), (start, stop)
        assert torch.equal(absmax[start // blocksize:-(-stop // blocksize)], want_absmax), (start, stop)
    del w
    out = ops.nf4_dequantize(packed, state, backend=backend)
    assert out.shape == (numel,) and out.dtype == torch.bfloat16
    for start, stop in spans:
        want = reference.nf4_dequantize_blocks(packed[start // 2:(stop + 1) // 2],
                                               absmax[start // blocksize:-(-stop // blocksize)], blocksize,
                                               (stop - start,), torch.bfloat16, "cuda")
        assert torch.equal(out[start:stop], want), (start, stop)
