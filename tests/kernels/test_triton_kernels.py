"""The Triton launchers of fastrit.kernels against the PyTorch oracle fastrit.ops.reference.

Here they run under the Triton interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 before
triton is imported); on a machine with a GPU and TRITON_INTERPRET=0 the same tests run on CUDA tensors.
Shapes stay small: the interpreter executes every program instance in numpy.
"""

import os
import subprocess
import sys
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
    packed, absmax = K.nf4_quantize_fwd(weight, blocksize)
    want_packed, want_absmax = ref.nf4_quantize_blocks(weight, blocksize)
    assert packed.shape == want_packed.shape and packed.dtype == torch.uint8
    assert absmax.shape == want_absmax.shape and absmax.dtype == torch.float32
    assert torch.equal(packed, want_packed)
    assert torch.equal(absmax, want_absmax)
    out = K.nf4_dequantize_fwd(packed, absmax, blocksize, shape, dtype)
    want = ref.nf4_dequantize_blocks(want_packed, want_absmax, blocksize, shape, dtype)
    assert out.shape == torch.Size(shape) and out.dtype == dtype
    assert torch.equal(out, want)


@pytest.mark.parametrize("blocksize", [64, 256])
def test_nf4_partial_last_block_divides_by_clamped_absmax(blocksize):
    # numel odd and not a multiple of blocksize; the last partial block is all zeros: its absmax is stored
    # clamped (1e-38) and the pad element takes code 7 like every zero
    weight = torch.randn(3 * blocksize + 5)
    weight[3 * blocksize :] = 0.0
    weight = weight.to(DEVICE)
    packed, absmax = K.nf4_quantize_fwd(weight, blocksize)
    want_packed, want_absmax = ref.nf4_quantize_blocks(weight, blocksize)
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
    packed, absmax_got = K.nf4_quantize_fwd(weight, blocksize)
    want_packed, want_absmax = ref.nf4_quantize_blocks(weight, blocksize)
    assert torch.equal(absmax_got, want_absmax)
    assert torch.equal(packed, want_packed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_dequantize_every_code(dtype):
    # every byte value once, two blocks of 64 with different scales, output in each dtype
    packed = torch.arange(256, dtype=torch.uint8, device=DEVICE).reshape(-1, 1)[:64]
    absmax = torch.tensor([0.5, 3.0], device=DEVICE)
    got = K.nf4_dequantize_fwd(packed, absmax, 64, (2, 64), dtype)
    assert torch.equal(got, ref.nf4_dequantize_blocks(packed, absmax, 64, (2, 64), dtype))


def test_nf4_odd_blocksize_is_refused():
    with pytest.raises(ValueError, match="blocksize"):
        K.nf4_quantize_fwd(rand(10), 63)


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
        "except ImportError:\n"
        "    print('absent')\n"
    )
    assert _python(code, ROOT, {"PYTHONPATH": str(ROOT)}).strip() == "absent"


def test_kernels_compile_for_a_gpu_target(tmp_path):
    # The GPU-only paths (native bf16 dot and cast, no FMA in ig_interpolate) down to a sm_90 cubin, no GPU needed.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    run = subprocess.run(
        [sys.executable, "-m", "tests.kernels.gpu_compile", "90"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(run.stdout.strip().splitlines()) == 11
