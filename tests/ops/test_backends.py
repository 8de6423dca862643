"""Which GPU the compiled CUDA kernels can run on, what `backends()` says about it, and what "auto" picks."""

import os
import sys
from pathlib import Path

import pytest
import torch

import fastrit
from fastrit.ops import _backend

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import build_cuda  # noqa: E402

sys.path.pop(0)


@pytest.mark.parametrize(
    "capability,sass,ptx,runs",
    [
        ((9, 0), (90,), (), True),
        ((8, 6), (80,), (), True),  # SASS runs on a later minor version of its major one
        ((8, 0), (86,), (), False),  # but not on an earlier one
        ((8, 0), (90,), (90,), False),  # nor on another major version, and PTX is not JIT-compiled backwards
        ((12, 0), (90,), (90,), True),  # PTX of an older architecture is JIT-compiled for a newer GPU
        ((12, 0), (80, 86, 90), (), False),
        ((8, 9), (80, 86), (86,), True),
    ],
)
def test_cuda_kernels_run_on(capability, sass, ptx, runs):
    status = _backend.cuda_kernels_run_on(capability, sass, ptx)
    assert (status == "available") == runs
    if not runs:
        assert f"{capability[0]}.{capability[1]}" in status
        assert all(f"sm_{a}" in status for a in sass) and all(f"compute_{a}" in status for a in ptx)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of the given capability, as far as fastrit.backends() can tell."""

    def install(capability):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    return install


def _cuda_built() -> bool:
    return fastrit.backends()["cuda"] not in ("extension built without CUDA kernels",) and bool(
        _backend.cuda_build_archs()[0]
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="fakes the GPU: only where there is none")
def test_auto_picks_triton_on_a_gpu_the_extension_was_not_built_for(fake_gpu):
    if not _cuda_built():
        pytest.skip("the extension holds no CUDA kernels")
    sass, ptx = _backend.cuda_build_archs()
    assert os.environ.get("TRITON_INTERPRET") == "1"  # triton counts as available (tests/conftest.py)
    older = (min(sass + ptx) // 10 - 1, 0)  # a major version below every architecture built: nothing runs there
    fake_gpu(older)
    status = fastrit.backends()
    assert status["cuda"] != "available"
    assert f"capability {older[0]}.{older[1]}" in status["cuda"] and f"sm_{sass[0]}" in status["cuda"]
    assert _backend.choose("auto", torch.device("cuda", 0)) == "triton"
    with pytest.raises(ValueError, match="backend: 'cuda' is not available: .*capability"):
        _backend.choose("cuda", torch.device("cuda", 0))
    built = (sass[0] // 10, sass[0] % 10)  # and on the architecture it was built for, the CUDA kernels
    fake_gpu(built)
    assert fastrit.backends()["cuda"] == "available"
    assert _backend.choose("auto", torch.device("cuda", 0)) == "cuda"


def test_the_extension_reports_the_architectures_it_was_built_for():
    if not _cuda_built():
        pytest.skip("the extension holds no CUDA kernels")
    sass, ptx = _backend.cuda_build_archs()
    assert all(isinstance(a, int) and 50 <= a < 200 for a in sass + ptx)
    assert ptx and max(ptx) == max(sass)  # PTX of the newest architecture is always built (build_cuda)


@pytest.mark.parametrize(
    "requested,visible,want,ptx",
    [
        ("9.0", [], "9.0+PTX", 90),
        ("8.0;8.6;9.0", [], "8.0;8.6;9.0+PTX", 90),
        ("9.0 8.0", [], "9.0+PTX;8.0", 90),
        ("8.0+PTX;9.0", [], "8.0+PTX;9.0", 80),  # the user chose where PTX goes
        ("9.0a", [], "9.0a+PTX", 0),  # arch-specific PTX: no later GPU can JIT it
        ("Hopper", [], "Hopper", 0),  # names are torch's to expand; no PTX arch known here
        (None, [(8, 9), (8, 9), (8, 0)], "8.0;8.9+PTX", 89),  # the visible GPUs
        ("", [], build_cuda.DEFAULT_ARCH_LIST, 90),
        (None, [], build_cuda.DEFAULT_ARCH_LIST, 90),
    ],
)
def test_arch_list_gets_ptx_of_its_newest_architecture(requested, visible, want, ptx):
    got = build_cuda.resolve_arch_list(requested, visible)
    assert got == want
    assert build_cuda.ptx_arch(got) == ptx
