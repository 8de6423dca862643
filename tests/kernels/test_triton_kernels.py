"""The Triton launchers of fastrit.kernels against the PyTorch oracle fastrit.ops.reference.

Here they run under the Triton interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 before
triton is imported); on a machine with a GPU and TRITON_INTERPRET=0 the same tests run on CUDA tensors.
Shapes stay small: the interpreter executes every program instance in numpy.
"""

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from fastrit import kernels as K
from fastrit.ops import reference as ref

ROOT = Path(__file__).resolve().parents[2]

if K._common.INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
    pytestmark = pytest.mark.gpu  # part of `make gpu-test`
else:
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 or a CUDA GPU", allow_module_level=True)

# dtype with the tolerance (rtol, atol) of an output in that dtype
FP32_TOL, BF16_TOL, FP16_TOL = (1e-5, 1e-5), (1.6e-2, 1e-2), (2e-3, 2e-3)
DTYPES = [
    pytest.param(torch.float32, FP32_TOL, id="fp32"),
    pytest.param(torch.bfloat16, BF16_TOL, id="bf16"),
    pytest.param(torch.float16, FP16_TOL, id="fp16"),
]
# float32 outputs (the IG accumulations) get FP32_TOL whatever the input dtype: every input is exact in float32


def rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape) * scale).to(device=DEVICE, dtype=dtype)


def assert_close(got, want, tol):
    rtol, atol = tol
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.device == want.device
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def no_launch(monkeypatch):
    """Every kernel replaced by one that fails when launched: for inputs that must not launch anything."""

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched for an empty input")

    for module in (K.ig, K.swiglu, K.sparse_grad, K.nf4):
        for name in dir(module):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, NoLaunch())


# ---------------------------------------------------------------------------------------------------------------------
# IG


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 20])
@pytest.mark.parametrize("n,d", [(1, 13), (7, 176), (63, 13)])
def test_ig_interpolate(n, d, m, dtype, tol):
    base, direction = rand(n, d, dtype=dtype), rand(n, d, dtype=dtype)
    alphas = torch.rand(m, device=DEVICE)
    got = K.ig_interpolate_fwd(base, direction, alphas)
    want = ref.ig_interpolate(base, direction, alphas)
    assert_close(got, want, tol)
    # the same float32 multiply and add (no FMA), then round-to-nearest-even: bit-exact, bf16 included
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 20])
@pytest.mark.parametrize("n,i", [(1, 176), (7, 13), (63, 176)])
def test_ig_accumulate(n, i, m, dtype, tol):
    act, grads = rand(n, i, dtype=dtype), rand(m, n, i, dtype=dtype)
    weights = torch.rand(m, device=DEVICE) - 0.25
    got = K.ig_accumulate_fwd(act, grads, weights)
    assert_close(got, ref.ig_accumulate(act, grads, weights), FP32_TOL)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize(
    "m,n,h,i", [(1, 1, 13, 176), (3, 7, 40, 13), (20, 7, 13, 176), (3, 63, 176, 13), (20, 63, 40, 176)]
)
def test_ig_accumulate_linear(m, n, h, i, dtype, tol):
    act, grad_resid, weight_down = rand(n, i, dtype=dtype), rand(m, n, h, dtype=dtype), rand(h, i, dtype=dtype)
    weights = torch.rand(m, device=DEVICE)
    got = K.ig_accumulate_linear_fwd(act, grad_resid, weight_down, weights)
    want = ref.ig_accumulate_linear(act, grad_resid, weight_down, weights)
    # float32 output; the sums over m and over H run in another order than torch's einsum/matmul
    assert_close(got, want, (2e-5, 2e-5))


def test_ig_empty(no_launch):
    for n, d, m in [(0, 13, 3), (7, 0, 3), (7, 13, 0)]:
        base = rand(n, d)
        got = K.ig_interpolate_fwd(base, base, torch.rand(m, device=DEVICE))
        assert got.shape == (m, n, d) and got.dtype == base.dtype
    for n, i in [(0, 13), (7, 0)]:
        got = K.ig_accumulate_fwd(rand(n, i, dtype=torch.bfloat16), rand(3, n, i), torch.rand(3, device=DEVICE))
        assert got.shape == (n, i) and got.dtype == torch.float32
        got = K.ig_accumulate_linear_fwd(rand(n, i), rand(3, n, 5), rand(5, i), torch.rand(3, device=DEVICE))
        assert got.shape == (n, i) and got.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ig_no_steps_or_no_hidden_gives_zeros(dtype):
    act = rand(7, 13, dtype=dtype)
    weights = torch.rand(0, device=DEVICE)
    got = K.ig_accumulate_fwd(act, rand(0, 7, 13, dtype=dtype), weights)
    assert_close(got, ref.ig_accumulate(act, rand(0, 7, 13, dtype=dtype), weights), FP32_TOL)
    assert not got.any()
    got = K.ig_accumulate_linear_fwd(act, rand(0, 7, 5, dtype=dtype), rand(5, 13, dtype=dtype), weights)
    assert got.shape == (7, 13) and not got.any()
    w3 = torch.rand(3, device=DEVICE)
    got = K.ig_accumulate_linear_fwd(act, rand(3, 7, 0, dtype=dtype), rand(0, 13, dtype=dtype), w3)
    assert got.shape == (7, 13) and not got.any()


# ---------------------------------------------------------------------------------------------------------------------
# SwiGLU


def _keep(kind, i):
    if kind == "none":
        return None
    if kind == "all":
        return torch.ones(i, dtype=torch.bool, device=DEVICE)
    if kind == "nothing":
        return torch.zeros(i, dtype=torch.bool, device=DEVICE)
    return (torch.rand(i) > 0.4).to(DEVICE)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("keep", ["none", "random"])
@pytest.mark.parametrize("n,i", [(1, 13), (7, 176), (63, 13), (63, 176)])
def test_swiglu_fwd_bwd(n, i, keep, dtype, tol):
    gate, up, grad_out = rand(n, i, dtype=dtype, scale=3.0), rand(n, i, dtype=dtype), rand(n, i, dtype=dtype)
    keep = _keep(keep, i)
    assert_close(K.swiglu_fwd(gate, up, keep), ref.swiglu_forward(gate, up, keep), tol)
    d_gate, d_up = K.swiglu_bwd(grad_out, gate, up, keep)
    want_gate, want_up = ref.swiglu_backward(grad_out, gate, up, keep)
    assert_close(d_gate, want_gate, tol)
    assert_close(d_up, want_up, tol)


@pytest.mark.parametrize("keep", ["all", "nothing"])
def test_swiglu_keep_all_or_nothing(keep):
    gate, up, grad_out = rand(7, 13, scale=3.0), rand(7, 13), rand(7, 13)
    mask = _keep(keep, 13)
    out = K.swiglu_fwd(gate, up, mask)
    d_gate, d_up = K.swiglu_bwd(grad_out, gate, up, mask)
    if keep == "nothing":
        assert not out.any() and not d_gate.any() and not d_up.any()
    else:
        assert_close(out, K.swiglu_fwd(gate, up, None), (0, 0))
        assert_close(d_gate, ref.swiglu_backward(grad_out, gate, up)[0], FP32_TOL)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy, under the interpreter
def test_swiglu_large_magnitudes():
    # saturated sigmoid on both sides (exp overflow to inf must give 0, not NaN)
    gate = torch.tensor([[-100.0, -30.0, -1.0, 0.0, 1.0, 30.0, 100.0]], device=DEVICE)
    up, grad_out = torch.ones_like(gate), torch.ones_like(gate)
    assert_close(K.swiglu_fwd(gate, up), ref.swiglu_forward(gate, up), FP32_TOL)
    for got, want in zip(K.swiglu_bwd(grad_out, gate, up), ref.swiglu_backward(grad_out, gate, up), strict=True):
        assert_close(got, want, FP32_TOL)


def test_swiglu_empty(no_launch):
    for n, i in [(0, 13), (7, 0)]:
        gate = rand(n, i, dtype=torch.bfloat16)
        keep = torch.ones(i, dtype=torch.bool, device=DEVICE)
        out = K.swiglu_fwd(gate, gate, keep)
        d_gate, d_up = K.swiglu_bwd(gate, gate, gate, keep)
        for t in (out, d_gate, d_up):
            assert t.shape == (n, i) and t.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------------
# sparse gradients


def _indices(k, size):
    # unsorted, with a repeat, touching both ends of the range
    idx = torch.randperm(size)[:k]
    if k >= 3:
        idx[0], idx[1], idx[2] = size - 1, 0, idx[-1]
    return idx.to(DEVICE)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("n,o,n_in,k", [(1, 13, 176, 1), (7, 176, 13, 5), (63, 13, 176, 13), (63, 176, 40, 37)])
def test_row_sparse_grad(n, o, n_in, k, dtype, tol):
    grad_out, x = rand(n, o, dtype=dtype), rand(n, n_in, dtype=dtype)
    rows = _indices(k, o)
    assert_close(K.row_sparse_grad_fwd(grad_out, x, rows), ref.row_sparse_grad(grad_out, x, rows), tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("n,h,n_i,k", [(1, 176, 13, 1), (7, 13, 176, 5), (63, 176, 13, 13), (63, 40, 176, 37)])
def test_col_sparse_grad(n, h, n_i, k, dtype, tol):
    grad_out, act = rand(n, h, dtype=dtype), rand(n, n_i, dtype=dtype)
    cols = _indices(k, n_i)
    assert_close(K.col_sparse_grad_fwd(grad_out, act, cols), ref.col_sparse_grad(grad_out, act, cols), tol)


def test_sparse_grad_mixed_dtypes():
    grad_out, x = rand(7, 13, dtype=torch.float32), rand(7, 20, dtype=torch.bfloat16)
    rows = _indices(5, 13)
    assert_close(K.row_sparse_grad_fwd(grad_out, x, rows), ref.row_sparse_grad(grad_out, x, rows), BF16_TOL)
    cols = _indices(5, 20)
    assert_close(K.col_sparse_grad_fwd(grad_out, x, cols), ref.col_sparse_grad(grad_out, x, cols), BF16_TOL)


def test_sparse_grad_no_tokens_gives_zeros():
    got = K.row_sparse_grad_fwd(rand(0, 13), rand(0, 20), _indices(4, 13))
    assert got.shape == (4, 20) and not got.any()
    got = K.col_sparse_grad_fwd(rand(0, 13), rand(0, 20), _indices(4, 20))
    assert got.shape == (13, 4) and not got.any()


def test_sparse_grad_empty(no_launch):
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    got = K.row_sparse_grad_fwd(rand(7, 13), rand(7, 20, dtype=torch.float16), empty)
    assert got.shape == (0, 20) and got.dtype == torch.float16
    got = K.row_sparse_grad_fwd(rand(7, 13), rand(7, 0), _indices(3, 13))
    assert got.shape == (3, 0)
    got = K.col_sparse_grad_fwd(rand(7, 13), rand(7, 20, dtype=torch.bfloat16), empty)
    assert got.shape == (13, 0) and got.dtype == torch.bfloat16
    got = K.col_sparse_grad_fwd(rand(7, 0), rand(7, 20), _indices(3, 20))
    assert got.shape == (0, 3)


# ---------------------------------------------------------------------------------------------------------------------
# NF4


def test_nf4_code_table_matches_reference():
    assert K.nf4.NF4_CODE == ref.NF4_CODE


def _nf4_weight(shape, dtype, blocksize):
    """Random values with an all-zero block, a tiny-scaled block, a large one, -0.0, and exact midpoint ties."""
    w = torch.randn(shape).reshape(-1)
    n = w.numel()
    if n >= 3 * blocksize:
        w[:blocksize] = 0.0
        w[blocksize : 2 * blocksize] *= 1e-30
        w[2 * blocksize : 3 * blocksize] *= 1e4
    if n > blocksize:
        code = torch.tensor(ref.NF4_CODE)
        mids = (code[:-1] + code[1:]) / 2
        start = n - n % blocksize - blocksize if n % blocksize else n - blocksize  # last full block
        w[start] = 1.0  # absmax 1.0: the scaled values are the values themselves
        w[start + 1 : start + 16] = mids  # on the midpoints: they go to the lower code
        w[start + 16] = -0.0
    return w.reshape(shape).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("shape", [(1,), (63,), (7, 13), (1000,), (13, 176)])
def test_nf4_quantize_bit_exact(shape, blocksize, dtype):
    weight = _nf4_weight(shape, dtype, blocksize)
    packed, absmax = K.nf4_quantize_fwd(weight, blocksize, "cpu")
    want_packed, want_absmax = ref.nf4_quantize_blocks(weight, blocksize, "cpu")
    assert packed.shape == want_packed.shape and packed.dtype == torch.uint8
    assert absmax.shape == want_absmax.shape and absmax.dtype == torch.float32
    assert torch.equal(packed, want_packed)
    assert torch.equal(absmax, want_absmax)
    out = K.nf4_dequantize_fwd(packed, absmax, blocksize, shape, dtype, "cpu")
    want = ref.nf4_dequantize_blocks(want_packed, want_absmax, blocksize, shape, dtype, "cpu")
    assert out.shape == torch.Size(shape) and out.dtype == dtype
    assert torch.equal(out, want)


@pytest.mark.parametrize("blocksize", [64, 256])
def test_nf4_partial_last_block_divides_by_clamped_absmax(blocksize):
    # numel odd and not a multiple of blocksize; the last partial block is all zeros: its absmax is stored
    # clamped (1e-38) and the pad element takes code 7 like every zero
    weight = torch.randn(3 * blocksize + 5)
    weight[3 * blocksize :] = 0.0
    weight = weight.to(DEVICE)
    packed, absmax = K.nf4_quantize_fwd(weight, blocksize, "cpu")
    want_packed, want_absmax = ref.nf4_quantize_blocks(weight, blocksize, "cpu")
    assert torch.equal(packed, want_packed) and torch.equal(absmax, want_absmax)
    assert absmax[-1].item() == torch.tensor(1e-38).item()
    assert packed[-1, 0].item() == 0x77


def _reciprocal_vs_division_values(absmax: float) -> torch.Tensor:
    """Values x in [-absmax, absmax] whose NF4 code differs between x * (1 / absmax) and x / absmax (float32)."""
    code = torch.tensor(ref.NF4_CODE)
    mids = (code[:-1] + code[1:]) / 2
    a = torch.tensor(absmax)
    near = (mids.double() * absmax).float()[:, None].view(torch.int32) + torch.arange(-64, 65, dtype=torch.int32)
    x = near.view(torch.float32).reshape(-1)
    x = x[x.abs() < absmax]
    differs = torch.bucketize(x / a, mids) != torch.bucketize(x * (1.0 / a), mids)
    return x[differs]


@pytest.mark.parametrize("absmax", [3.0, 0.3])
def test_nf4_full_blocks_multiply_by_reciprocal_partial_block_divides(absmax):
    blocksize = 64
    x = _reciprocal_vs_division_values(absmax)
    assert 0 < x.numel() < blocksize
    weight = torch.zeros(2 * blocksize + x.numel() + 1)
    for start in (0, 2 * blocksize):  # a full block and the final partial one
        weight[start] = absmax
        weight[start + 1 : start + 1 + x.numel()] = x
    weight = weight.to(DEVICE)
    packed, absmax_got = K.nf4_quantize_fwd(weight, blocksize, "cpu")
    want_packed, want_absmax = ref.nf4_quantize_blocks(weight, blocksize, "cpu")
    assert torch.equal(absmax_got, want_absmax)
    assert torch.equal(packed, want_packed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_dequantize_every_code(dtype):
    # every byte value once, two blocks of 64 with different scales, output in each dtype
    packed = torch.arange(256, dtype=torch.uint8, device=DEVICE).reshape(-1, 1)[:64]
    absmax = torch.tensor([0.5, 3.0], device=DEVICE)
    for rule in ("cpu", "cuda"):
        got = K.nf4_dequantize_fwd(packed, absmax, 64, (2, 64), dtype, rule)
        assert torch.equal(got, ref.nf4_dequantize_blocks(packed, absmax, 64, (2, 64), dtype, rule))


def test_nf4_odd_blocksize_is_refused():
    with pytest.raises(ValueError, match="blocksize"):
        K.nf4_quantize_fwd(rand(10), 63)


def test_nf4_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="rule"):
        K.nf4_quantize_fwd(rand(10), 64, "gpu")
    with pytest.raises(ValueError, match="rule"):
        K.nf4_dequantize_fwd(torch.zeros(5, 1, dtype=torch.uint8, device=DEVICE), rand(1), 64, (10,), torch.float32,
                             "gpu")


# --- rule "cuda": bitsandbytes' CUDA kernels ------------------------------------------------------------------------


def test_nf4_cuda_thresholds_match_reference():
    assert K.nf4.NF4_CUDA_THRESHOLDS == ref.NF4_CUDA_THRESHOLDS


def _from_bits(*bits):
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


def _codes(packed, n):
    flat = packed.reshape(-1).cpu()
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n].tolist()


def test_nf4_cuda_rule_thresholds_smallest_case():
    # absmax 1.0, so the scaled values are the values: only the thresholds decide. At four of them bitsandbytes'
    # CUDA kernel compares against a float 1 ulp away from the midpoint that its CPU backend uses.
    weight = torch.zeros(64)
    weight[:5] = _from_bits(0x3F800000, 0x3DF64863, 0x3F006D04, 0x3F5C89DA, 0xBF591CD8)
    weight = weight.to(DEVICE)
    packed, absmax = K.nf4_quantize_fwd(weight, 64, "cuda")
    assert _codes(packed, 5) == [15, 8, 13, 15, 1]  # bitsandbytes' CUDA codes
    assert absmax.tolist() == [1.0]
    packed, _ = K.nf4_quantize_fwd(weight, 64, "cpu")
    assert _codes(packed, 5) == [15, 9, 12, 14, 0]  # its CPU backend's


@pytest.mark.parametrize("numel", [64, 64 + 37, 37])
def test_nf4_cuda_rule_all_zero_block_gives_zero_bytes(numel):
    # reciprocal(0) = inf, 0 * inf = NaN, NaN -> code 0: bytes 0x00, absmax stored as 0 (full or partial block)
    weight = torch.zeros(numel, device=DEVICE)
    if numel > 64:
        weight[64:] = torch.randn(numel - 64) * 1e-39  # subnormals only: flushed to zero, an all-zero block
    packed, absmax = K.nf4_quantize_fwd(weight, 64, "cuda")
    assert packed[: min(numel, 64) // 2].eq(0).all()
    assert absmax[0].item() == 0.0
    if numel > 64:
        assert packed[32:].eq(0).all() and absmax[1].item() == 0.0


def test_nf4_cuda_rule_nan_and_inf():
    nan, inf = float("nan"), float("inf")
    weight = torch.zeros(4 * 64 + 6)
    weight[:64] = torch.linspace(-2, 2, 64)
    weight[5] = nan  # ignored by absmax, coded 0
    weight[64:128] = nan  # a full block of NaN: absmax -FLT_MAX (bitsandbytes' starting value), codes 0
    weight[128:192] = torch.linspace(-1, 1, 64)
    weight[130] = inf  # absmax inf: reciprocal 0, every finite value scales to 0 (code 7), inf to NaN (code 0)
    weight[192:256] = 0.5
    weight[256:] = nan  # a partial block of NaN: its 0.0 padding makes absmax 0
    weight = weight.to(DEVICE)
    packed, absmax = K.nf4_quantize_fwd(weight, 64, "cuda")
    want_packed, want_absmax = ref.nf4_quantize_blocks(weight.cpu(), 64, "cuda")
    assert torch.equal(packed.cpu(), want_packed) and torch.equal(absmax.cpu(), want_absmax)
    codes = _codes(packed, weight.numel())
    assert absmax.tolist() == [2.0, -torch.finfo(torch.float32).max, inf, 0.5, 0.0]
    assert codes[5] == 0 and codes[64:128] == [0] * 64
    assert codes[130] == 0 and set(codes[128:130] + codes[131:192]) == {7}
    assert codes[192:256] == [15] * 64 and codes[256:] == [0] * 6


def _power_of_two_scaled(numel, blocksize, dtype):
    """Random values whose every block has a power-of-two absmax: the GPU's approximate reciprocal is then exact,
    so rule "cuda" on a GPU must equal the reference bit for bit too."""
    w = torch.randn(numel)
    starts = torch.arange(0, numel, blocksize)
    w = w.clamp(-3.9, 3.9)
    w[starts] = 4.0 * torch.where(starts % 3 == 0, -1.0, 1.0)
    w[starts[1::4]] = 0.0
    return w.to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("numel", [1, 63, 1000, 2 * 4096 + 37])
def test_nf4_cuda_rule_matches_reference(numel, blocksize, dtype):
    weight = _power_of_two_scaled(numel, blocksize, dtype)
    if numel > 3 * blocksize:
        weight[blocksize : 2 * blocksize] = 0.0  # an all-zero block
        weight[blocksize + 3] = 1e-40  # and a subnormal in it (bfloat16 keeps it; float16 rounds it to 0)
    packed, absmax = K.nf4_quantize_fwd(weight, blocksize, "cuda")
    want_packed, want_absmax = ref.nf4_quantize_blocks(weight.cpu(), blocksize, "cuda")
    assert torch.equal(packed.cpu(), want_packed) and torch.equal(absmax.cpu(), want_absmax)
    out = K.nf4_dequantize_fwd(packed, absmax, blocksize, (numel,), dtype, "cuda")
    want = ref.nf4_dequantize_blocks(want_packed, want_absmax, blocksize, (numel,), dtype, "cuda")
    assert torch.equal(out.cpu(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_cuda_rule_dequantize_flushes_subnormals(dtype):
    # bitsandbytes' CUDA dequantizer multiplies with FTZ: a subnormal absmax, or a subnormal product, gives 0
    packed = torch.full((64, 1), 0xF0, dtype=torch.uint8, device=DEVICE)  # codes 15 (1.0) and 7 (0.0)
    absmax = torch.tensor([1e-39, 2e-38], device=DEVICE)
    got = K.nf4_dequantize_fwd(packed, absmax, 64, (128,), dtype, "cuda").float().cpu()
    assert got[:64].eq(0).all()  # 1.0 * subnormal absmax
    assert got[64::2].eq(torch.tensor(2e-38).to(dtype).float()).all()
    cpu_rule = K.nf4_dequantize_fwd(packed, absmax, 64, (128,), torch.float32, "cpu").cpu()
    assert cpu_rule[0].item() == torch.tensor(1e-39).item()  # the CPU rule keeps it


def test_nf4_empty(no_launch):
    packed, absmax = K.nf4_quantize_fwd(rand(0, 13, dtype=torch.bfloat16), 64)
    assert packed.shape == (0, 1) and packed.dtype == torch.uint8
    assert absmax.shape == (0,) and absmax.dtype == torch.float32
    out = K.nf4_dequantize_fwd(packed, absmax, 64, (0, 13), torch.float16)
    assert out.shape == (0, 13) and out.dtype == torch.float16


# ---------------------------------------------------------------------------------------------------------------------
# the package itself


def _python(code, cwd, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    run = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_import_is_lean(tmp_path):
    code = (
        "import sys, torch, fastrit.kernels as K\n"
        "assert not torch.cuda.is_initialized()\n"
        "print(sorted(K.__all__))\n"
    )
    out = _python(code, tmp_path, {"TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""})
    assert "swiglu_bwd" in out


def test_top_level_kernels_name_is_not_taken(tmp_path):
    # From the repository root, `import kernels` must reach the PyPI package of that name (bitsandbytes
    # imports it), or behave as if absent, never give fastrit's kernels.
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("def get_kernel(*args):\n    return 'pypi'\n")
    out = _python(
        "import kernels; print(kernels.get_kernel())", ROOT, {"PYTHONPATH": f"{ROOT}{os.pathsep}{fake.parent}"}
    )
    assert out.strip() == "pypi"
    code = (
        "import kernels\n"
        "assert not hasattr(kernels, 'swiglu_fwd')\n"
        "try:\n"
        "    from kernels import get_kernel\n"
        "    print('pypi')\n"
        "except ImportError:\n"
        "    print('absent')\n"
    )
    # transformers 5.25 depends on the PyPI package, so it may be installed; either way never fastrit's kernels
    try:
        metadata.version("kernels")
        installed = "pypi"
    except metadata.PackageNotFoundError:
        installed = "absent"
    assert _python(code, ROOT, {"PYTHONPATH": str(ROOT)}).strip() == installed


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills_or_oversized_grids(tmp_path):
    # Every Triton kernel with every GPU autotune config, and the CUDA kernels of csrc/cuda/, compiled for
    # sm_80 and sm_90 (no GPU needed): no register spills, grids within the hardware limits at 8B shapes, the
    # approximate reciprocal in the NF4 quantizers' PTX. The guard itself: tests/kernels/gpu_compile.py.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    run = subprocess.run(
        [sys.executable, "-m", "tests.kernels.gpu_compile", "80", "90"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    lines = run.stdout.strip().splitlines()
    for arch in (80, 90):
        assert any(line.startswith(f"triton sm_{arch} nf4_quantize") for line in lines)
        assert any(line.startswith(f"triton sm_{arch} ig_linear_act") for line in lines)
        if shutil.which("nvcc"):
            assert any(line.startswith(f"cuda sm_{arch}") and "nf4_quantize_kernel" in line for line in lines)


def test_compile_guard_catches_spills_grids_and_a_missing_reciprocal():
    from tests.kernels import gpu_compile as guard

    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90'\n"
        "ptxas info    : Function properties for k\n"
        "    616 bytes stack frame, 612 bytes spill stores, 604 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 0 barriers\n"
    )
    assert guard._parse_ptxas(log) == [(255, 1216)]
    # the old ig_linear_act grid (N tiles on axis 1) at 8B shapes
    old = guard.Case("old", None, {}, grids=[lambda meta: (112, triton_cdiv(guard.ROWS_8B, meta["BLOCK_N"]))])
    assert guard._grid_faults(old, {"BLOCK_N": 16})
    new = guard.Case("new", None, {}, grids=[K.ig.ig_linear_act_grid(guard.ROWS_8B, guard.INTER_8B)])
    assert not guard._grid_faults(new, {"BLOCK_N": 16, "BLOCK_I": 128})
    # NF4 quantizers: every entry must run the approximate reciprocal (the old ones divided exactly)
    exact = ".visible .entry nf4_quantize_kernel(\n{\n\tdiv.rn.f32 %f3, %f1, %f2;\n}\n"
    approx = ".visible .entry _Z19nf4_quantize_kernelIfEvv(\n{\n\trcp.approx.ftz.f32 %f3, %f1;\n}\n"
    assert guard._lacks_rcp(exact, "nf4_quantize_kernel") and guard._lacks_rcp("", "nf4_quantize_kernel")
    assert not guard._lacks_rcp(approx, "nf4_quantize_kernel")
    assert guard._lacks_rcp(approx + exact, "nf4_quantize_kernel")


def triton_cdiv(a, b):
    return -(-a // b)


def test_autotune_keys_do_not_hold_the_token_count():
    # a new sequence length must not re-run every autotune config: keys hold weight shapes and size buckets
    row_counts = {"N", "ND", "NI", "NUMEL"}
    for module in (K.ig, K.swiglu, K.sparse_grad, K.nf4):
        for name in dir(module):
            kernel = getattr(module, name)
            if name.endswith("_kernel") and hasattr(kernel, "keys"):
                assert not row_counts & set(kernel.keys), (name, kernel.keys)
    assert K._common.size_bucket(1) == 1 and K._common.size_bucket(1000) == K._common.size_bucket(1024) == 1024
    assert K._common.size_bucket(1025) == 2048 and K._common.size_bucket(0) == 1
