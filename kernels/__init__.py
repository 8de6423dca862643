"""Triton kernels of fastrit, installed as ``fastrit.kernels`` (setup.py maps this folder there).

Launchers (plain functions on torch tensors; inputs already validated and contiguous by ``fastrit.ops``):
``ig_interpolate_fwd``, ``ig_accumulate_fwd``, ``ig_accumulate_linear_fwd``, ``swiglu_fwd``, ``swiglu_bwd``,
``row_sparse_grad_fwd``, ``col_sparse_grad_fwd``, ``nf4_quantize_fwd``, ``nf4_dequantize_fwd``.
Importing compiles nothing and touches no GPU; each kernel compiles on its first launch.
"""

if __name__ == "kernels":
    # Imported as a top-level ``kernels`` (the repository root is on sys.path when running the tests or
    # ``python -m benchmarks...``). That name belongs to another PyPI package, which bitsandbytes imports: hand
    # over to it when it is installed, or fail exactly as if this folder were not here.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _module  # the import statement returns what sys.modules holds after this file ran
        _spec.loader.exec_module(_module)
    else:
        # No such package is installed. Look like an empty namespace package (no __file__, no __version__),
        # which is what libraries probing for `kernels` (transformers, bitsandbytes) treat as absent; raising
        # here instead would break `import transformers` itself. `from kernels import x` still fails.
        del __file__
else:
    from .ig import ig_accumulate_fwd, ig_accumulate_linear_fwd, ig_interpolate_fwd
    from .nf4 import nf4_dequantize_fwd, nf4_quantize_fwd
    from .sparse_grad import col_sparse_grad_fwd, row_sparse_grad_fwd
    from .swiglu import swiglu_bwd, swiglu_fwd

    __all__ = [
        "ig_interpolate_fwd",
        "ig_accumulate_fwd",
        "ig_accumulate_linear_fwd",
        "swiglu_fwd",
        "swiglu_bwd",
        "row_sparse_grad_fwd",
        "col_sparse_grad_fwd",
        "nf4_quantize_fwd",
        "nf4_dequantize_fwd",
    ]
