"""What the Triton kernel tests (tests/kernels/test_triton_*.py, one file per op) share: the device, each dtype with
its tolerance, the odd shapes, random inputs, and the comparison with the oracle fastrit/ops/reference.py.

The kernels run under the Triton interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 before triton
is imported); on a machine with a GPU and TRITON_INTERPRET=0 the same tests run on CUDA tensors (each test file then
marks itself ``gpu``: part of ``make gpu-test``). With neither, importing this module skips the test file that imports
it. Shapes stay small: the interpreter executes every program instance in numpy.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from fastrit import kernels as K

if K._common.INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 or a CUDA GPU", allow_module_level=True)

#: the tolerance of an output in each dtype; the IG accumulations' outputs are float32 whatever the input dtype (every
#: input is exact in float32), so they take float32's for every input dtype
FP32_ATOL, FP32_RTOL = 1e-5, 1e-5
BF16_ATOL, BF16_RTOL = 1e-2, 1.6e-2
FP16_ATOL, FP16_RTOL = 2e-3, 2e-3

#: ``dtype, atol, rtol``: each input dtype with the tolerance of an output in that dtype (Liger-Kernel's form)
DTYPES = [
    pytest.param(torch.float32, FP32_ATOL, FP32_RTOL, id="fp32"),
    pytest.param(torch.bfloat16, BF16_ATOL, BF16_RTOL, id="bf16"),
    pytest.param(torch.float16, FP16_ATOL, FP16_RTOL, id="fp16"),
]
#: the same dtypes alone: for outputs compared bit for bit, or always float32 (one tolerance for every input dtype)
INPUT_DTYPES = [pytest.param(param.values[0], id=param.id) for param in DTYPES]

#: odd sizes (ARCHITECTURE.md, test conventions): a single row, fewer rows than a tile, one short of a power of two
#: (the NF4 tests, which see a flattened weight, add 1000 elements: tests/kernels/test_triton_nf4.py)
ROWS = (1, 7, 63)
#: feature widths: one ragged tile, and more than one tile with a ragged end
WIDTHS = (13, 176)
#: ``(rows, width)`` of the element-wise and row-wise ops: every odd row count with every width
SHAPES_2D = list(itertools.product(ROWS, WIDTHS))
#: the same less the largest, for an op whose output has the steps as a third axis (IG interpolation: ``[m, N, D]``),
#: where the interpreter would spend more on that one shape than on all the others
SHAPES_2D_SMALL = [shape for shape in SHAPES_2D if shape != (ROWS[-1], WIDTHS[-1])]
#: IG step counts: one step, a few, more than a tile of steps
STEPS = (1, 3, 20)

KERNEL_MODULES = (K.ig, K.swiglu, K.sparse_grad, K.nf4)


def rand(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    """Standard normal values times ``scale``, in ``dtype`` on :data:`DEVICE` (drawn on the CPU: the same on a GPU)."""
    return (torch.randn(*shape) * scale).to(device=DEVICE, dtype=dtype)


def assert_close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> None:
    """``got`` has ``want``'s shape, dtype and device, and equals it within ``atol + rtol * |want|``."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.device == want.device
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def forbid_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace every kernel by one that fails when launched: for inputs that must not launch anything."""

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched for an empty input")

    for module in KERNEL_MODULES:
        for name in dir(module):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, NoLaunch())
