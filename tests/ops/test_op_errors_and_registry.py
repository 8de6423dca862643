"""Bad arguments raise the same clear error from every backend; the compiled ops are registered properly."""

import os

import pytest
import torch

import fastrit
import fastrit.ops as ops
from tests.ops.conftest import BACKENDS

BAD_CALLS = [
    ("base", TypeError, lambda b: ops.ig_interpolate(torch.ones(3, 4, dtype=torch.int32), torch.ones(3, 4),
                                                     torch.rand(2), backend=b)),
    ("direction", ValueError, lambda b: ops.ig_interpolate(torch.ones(3, 4), torch.ones(3, 5), torch.rand(2),
                                                           backend=b)),
    ("grads", ValueError, lambda b: ops.ig_accumulate(torch.ones(3, 4), torch.ones(2, 3, 5), torch.rand(2),
                                                      backend=b)),
    ("weights", ValueError, lambda b: ops.ig_accumulate(torch.ones(3, 4), torch.ones(2, 3, 4), torch.rand(3),
                                                        backend=b)),
    ("act", ValueError, lambda b: ops.ig_accumulate(torch.ones(3, 4, 1), torch.ones(2, 3, 4), torch.rand(2),
                                                    backend=b)),
    ("weight_down", ValueError, lambda b: ops.ig_accumulate_linear(
        torch.ones(3, 4), torch.ones(2, 3, 6), torch.ones(5, 4), torch.rand(2), backend=b)),
    ("up", ValueError, lambda b: ops.swiglu(torch.ones(3, 4), torch.ones(3, 4, dtype=torch.float16), backend=b)),
    ("keep", TypeError, lambda b: ops.swiglu(torch.ones(3, 4), torch.ones(3, 4), torch.ones(4), backend=b)),
    ("keep", ValueError, lambda b: ops.swiglu(torch.ones(3, 4), torch.ones(3, 4),
                                              torch.ones(5, dtype=torch.bool), backend=b)),
    ("rows", ValueError, lambda b: ops.row_sparse_grad(torch.ones(3, 4), torch.ones(3, 2), torch.tensor([0, 4]),
                                                       backend=b)),
    ("rows", ValueError, lambda b: ops.row_sparse_grad(torch.ones(3, 4), torch.ones(3, 2), torch.tensor([-1]),
                                                       backend=b)),
    ("rows", TypeError, lambda b: ops.row_sparse_grad(torch.ones(3, 4), torch.ones(3, 2),
                                                      torch.tensor([0], dtype=torch.int32), backend=b)),
    ("cols", ValueError, lambda b: ops.col_sparse_grad(torch.ones(3, 4), torch.ones(3, 2), torch.tensor([2]),
                                                       backend=b)),
    ("x", ValueError, lambda b: ops.row_sparse_grad(torch.ones(3, 4), torch.ones(2, 2), torch.tensor([1]),
                                                    backend=b)),
    ("up", ValueError, lambda b: ops.swiglu(torch.ones(3, 4), torch.ones(3, 4, device="meta"), backend=b)),
    ("weights", ValueError, lambda b: ops.ig_accumulate_linear(
        torch.ones(3, 4), torch.ones(2, 3, 6), torch.ones(6, 4), torch.rand(2, device="meta"), backend=b)),
    ("weight", TypeError, lambda b: ops.nf4_quantize(torch.ones(64, dtype=torch.int64), backend=b)),
    ("backend", ValueError, lambda b: ops.swiglu(torch.ones(3, 4), torch.ones(3, 4), backend="fast")),
]


@pytest.mark.parametrize("argument,error,call", BAD_CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_CALLS)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_name_themselves_on_every_backend(backend, argument, error, call):
    with pytest.raises(error, match=f"^{argument}:"):
        call(backend)


def test_cuda_backend_without_a_device_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="backend: 'cuda' is not available: "):
        ops.swiglu(torch.ones(3, 4), torch.ones(3, 4), backend="cuda")
    assert fastrit.backends()["cuda"] != "available"


def test_backends_report_every_name_with_a_status():
    status = fastrit.backends()
    assert set(status) == {"torch", "triton", "cpp", "cuda"}
    assert status["torch"] == "available"
    assert all(isinstance(value, str) and value for value in status.values())


def extension_expected() -> bool:
    return os.environ.get("FASTRIT_BUILD_EXT", "1") != "0"


def test_extension_is_built_and_loaded():
    """CI builds fastrit._C; a silently missing extension would skip every cpp test."""
    if not extension_expected():
        pytest.skip("FASTRIT_BUILD_EXT=0")
    assert fastrit.backends()["cpp"] == "available", fastrit.backends()["cpp"]


COMPILED_OPS = ["ig_interpolate", "ig_accumulate", "ig_accumulate_linear", "swiglu_fwd", "swiglu_bwd",
                "row_sparse_grad", "col_sparse_grad", "nf4_quantize", "nf4_dequantize"]


def compiled_or_skip():
    if fastrit.backends()["cpp"] != "available":
        pytest.skip(f"extension: {fastrit.backends()['cpp']}")


@pytest.mark.parametrize("name", COMPILED_OPS)
def test_cpu_and_cuda_kernels_are_in_the_dispatcher(name):
    compiled_or_skip()
    dump = torch._C._dispatch_dump(f"fastrit::{name}")
    assert "CPU:" in dump
    if torch.version.cuda is not None and fastrit.backends()["cuda"] != "extension built without CUDA kernels":
        assert "CUDA:" in dump


def opcheck_cases():
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    keep = torch.tensor([True, False, True, True, False, True, True])
    w = r(16, 64)
    return {
        "ig_interpolate": (r(5, 7), r(5, 7), torch.rand(3)),
        "ig_accumulate": (r(5, 7), r(3, 5, 7), torch.rand(3)),
        "ig_accumulate_linear": (r(5, 7), r(3, 5, 4), r(4, 7), torch.rand(3)),
        "swiglu_fwd": (r(5, 7).requires_grad_(), r(5, 7).requires_grad_(), keep),
        "swiglu_bwd": (r(5, 7), r(5, 7), r(5, 7), None),
        "row_sparse_grad": (r(5, 7), r(5, 3), torch.tensor([6, 0, 2])),
        "col_sparse_grad": (r(5, 3), r(5, 7), torch.tensor([6, 0, 2])),
        "nf4_quantize": (w, 64),
        "nf4_dequantize": (*torch.ops.fastrit.nf4_quantize(w, 64), 64, [16, 64], torch.bfloat16)
        if fastrit.backends()["cpp"] == "available" else None,
    }


@pytest.mark.parametrize("name", COMPILED_OPS)
def test_opcheck(name):
    compiled_or_skip()
    args = opcheck_cases()[name]
    torch.library.opcheck(getattr(torch.ops.fastrit, name).default, args)
