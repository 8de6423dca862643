"""Triton kernels of fastrit, installed as ``fastrit.kernels`` (setup.py maps this folder there).

Launchers (plain functions on torch tensors; inputs already validated and contiguous by ``fastrit.ops``):
``ig_interpolate_fwd``, ``ig_accumulate_fwd``, ``ig_accumulate_linear_fwd``, ``swiglu_fwd``, ``swiglu_bwd``,
``row_sparse_grad_fwd``, ``col_sparse_grad_fwd``, ``nf4_quantize_fwd``, ``nf4_dequantize_fwd``.
Importing compiles nothing, touches no GPU and imports no triton (launchers and modules load on first access: PEP 562
``__getattr__``); each kernel compiles on its first launch.
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
    import importlib

    #: launcher -> the module of this package that defines it
    _LAUNCHERS = {
        "ig_interpolate_fwd": "ig",
        "ig_accumulate_fwd": "ig",
        "ig_accumulate_linear_fwd": "ig",
        "swiglu_fwd": "swiglu",
        "swiglu_bwd": "swiglu",
        "row_sparse_grad_fwd": "sparse_grad",
        "col_sparse_grad_fwd": "sparse_grad",
        "nf4_quantize_fwd": "nf4",
        "nf4_dequantize_fwd": "nf4",
    }
    _MODULES = ("_common", "ig", "nf4", "nf4_code", "sparse_grad", "swiglu")

    __all__ = list(_LAUNCHERS)

    def __getattr__(name: str):
        """A launcher or a module of this package, imported on first use: importing the package imports no
        triton, so that every floor may read ``fastrit.kernels.nf4_code`` (the NF4 table, plain Python)."""
        if name in _LAUNCHERS:
            return getattr(importlib.import_module(f".{_LAUNCHERS[name]}", __name__), name)
        if name in _MODULES:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*globals(), *_LAUNCHERS, *_MODULES})
