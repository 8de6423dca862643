"""fastrit ops: one public function per op, each on ``backend="auto" | "torch" | "triton" | "cpp" | "cuda"``.

``reference`` holds the plain-PyTorch definitions every backend is tested against;
:func:`backends` says which backends can run here and, if not, why.
"""

from ._backend import BACKENDS, backends
from .ig import ig_accumulate, ig_accumulate_linear, ig_interpolate
from .nf4 import NF4_BLOCKSIZES, nf4_dequantize, nf4_linear, nf4_quantize
from .sparse_grad import col_sparse_grad, row_sparse_grad
from .swiglu import swiglu

__all__ = [
    "BACKENDS",
    "NF4_BLOCKSIZES",
    "backends",
    "col_sparse_grad",
    "ig_accumulate",
    "ig_accumulate_linear",
    "ig_interpolate",
    "nf4_dequantize",
    "nf4_linear",
    "nf4_quantize",
    "row_sparse_grad",
    "swiglu",
]
