"""The NF4 kernels (fastrit.kernels.nf4: blockwise quantize and dequantize, under bitsandbytes' CPU rule and its CUDA
rule) against fastrit.ops.reference, bit for bit.

Devices and dtypes: tests/kernels/_triton_cases.py.
"""

import pytest
import torch

from fastrit import kernels as K
from fastrit.ops import reference as ref
from tests.kernels._triton_cases import DEVICE, INPUT_DTYPES, forbid_launches, rand

pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []  # on a GPU: part of `make gpu-test`

#: every rank, odd element counts (1, 63, 91, 1000, 2288): a partial block alone, full blocks and a partial last one
SHAPES = [(1,), (63,), (7, 13), (1000,), (13, 176)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("shape", SHAPES)
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


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
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


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
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


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_nf4_cuda_rule_dequantize_flushes_subnormals(dtype):
    # bitsandbytes' CUDA dequantizer multiplies with FTZ: a subnormal absmax, or a subnormal product, gives 0
    packed = torch.full((64, 1), 0xF0, dtype=torch.uint8, device=DEVICE)  # codes 15 (1.0) and 7 (0.0)
    absmax = torch.tensor([1e-39, 2e-38], device=DEVICE)
    got = K.nf4_dequantize_fwd(packed, absmax, 64, (128,), dtype, "cuda").float().cpu()
    assert got[:64].eq(0).all()  # 1.0 * subnormal absmax
    assert got[64::2].eq(torch.tensor(2e-38).to(dtype).float()).all()
    cpu_rule = K.nf4_dequantize_fwd(packed, absmax, 64, (128,), torch.float32, "cpu").cpu()
    assert cpu_rule[0].item() == torch.tensor(1e-39).item()  # the CPU rule keeps it


def test_nf4_empty(monkeypatch):
    forbid_launches(monkeypatch)
    packed, absmax = K.nf4_quantize_fwd(rand(0, 13, dtype=torch.bfloat16), 64)
    assert packed.shape == (0, 1) and packed.dtype == torch.uint8
    assert absmax.shape == (0,) and absmax.dtype == torch.float32
    out = K.nf4_dequantize_fwd(packed, absmax, 64, (0, 13), torch.float16)
    assert out.shape == (0, 13) and out.dtype == torch.float16
