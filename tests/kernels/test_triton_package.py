"""The Triton kernel package itself (fastrit.kernels): a lean import, the top-level name ``kernels`` left to PyPI,
the sm_80/sm_90 compile guard (tests/kernels/gpu_compile.py) and the autotune keys.

The kernels op by op: tests/kernels/test_triton_{ig,swiglu,sparse_grad,nf4}.py; every autotune config:
tests/kernels/test_triton_autotune_configs.py.
"""

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from fastrit import kernels as K
from tests.kernels._triton_cases import DEVICE, KERNEL_MODULES

pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []  # on a GPU: part of `make gpu-test`

ROOT = Path(__file__).resolve().parents[2]


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
    for module in KERNEL_MODULES:
        for name in dir(module):
            kernel = getattr(module, name)
            if name.endswith("_kernel") and hasattr(kernel, "keys"):
                assert not row_counts & set(kernel.keys), (name, kernel.keys)
    assert K._common.size_bucket(1) == 1 and K._common.size_bucket(1000) == K._common.size_bucket(1024) == 1024
    assert K._common.size_bucket(1025) == 2048 and K._common.size_bucket(0) == 1
