"""Which backends exist, why not, and which one an op call uses.

``"auto"`` picks cuda, then triton, on CUDA tensors and cpp, then torch, on CPU tensors. Nothing
here initialises CUDA or compiles a kernel at import time.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("torch", "triton", "cpp", "cuda")
_PROBE_OP = "fastrit::swiglu_fwd"


@functools.cache
def extension_status() -> str:
    """"loaded", or why ``fastrit._C`` could not be loaded."""
    try:
        importlib.import_module("fastrit._C")
    except ImportError as error:
        return f"extension fastrit._C not built or not loadable ({error})"
    except OSError as error:  # a shared library it links against is missing
        return f"extension fastrit._C failed to load ({error})"
    importlib.import_module("fastrit.ops._library")  # fake kernels and autograd of the compiled ops
    return "loaded"


def _has_kernel(key: str) -> bool:
    return extension_status() == "loaded" and torch._C._dispatch_has_kernel_for_dispatch_key(_PROBE_OP, key)


def _triton_status() -> str:
    try:
        importlib.import_module("triton")
    except ImportError as error:
        return f"triton not installed ({error})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "available"
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on the CPU interpreter)"
    return "available"


def backends() -> dict[str, str]:
    """For each backend name, ``"available"`` or the reason it is not."""
    status = {"torch": "available", "triton": _triton_status()}
    ext = extension_status()
    if ext != "loaded":
        status["cpp"] = ext
    else:
        status["cpp"] = "available" if _has_kernel("CPU") else "no CPU kernels in the extension"
    if ext != "loaded":
        status["cuda"] = ext
    elif not _has_kernel("CUDA"):
        status["cuda"] = "extension built without CUDA kernels"
    elif not torch.cuda.is_available():
        status["cuda"] = "compiled, no CUDA device"
    else:
        status["cuda"] = "available"
    return status


def choose(backend: str, device: torch.device) -> str:
    """The backend an op on ``device`` runs with; ValueError naming ``backend`` if it cannot."""
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"backend: expected one of auto, {', '.join(BACKENDS)}, got {backend!r}")
    status = backends()
    if backend == "auto":
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpp", "torch")
        return next(name for name in order if status[name] == "available")
    if status[backend] != "available":
        raise ValueError(f"backend: {backend!r} is not available: {status[backend]}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend: 'cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"backend: 'cpp' needs CPU tensors, got tensors on {device}")
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend: 'triton' on CPU tensors needs TRITON_INTERPRET=1 (the interpreter)")
    return backend


def dispatch(op: str, backend: str, device: torch.device, reference_fn, *args):
    """Run ``op`` on ``args`` with the backend :func:`choose` picks: ``reference_fn`` (torch), the Triton
    launcher ``fastrit.kernels.<op>_fwd``, or ``torch.ops.fastrit.<op>`` (cpp and cuda)."""
    name = choose(backend, device)
    if name == "torch":
        return reference_fn(*args)
    if name == "triton":
        return getattr(triton_kernels(), f"{op}_fwd")(*args)
    return compiled_op(op)(*args)


def compiled_op(name: str):
    """``torch.ops.fastrit.<name>`` (the extension is loaded by :func:`choose` having found it available)."""
    return getattr(torch.ops.fastrit, name)


def triton_kernels():
    """The Triton launchers (imported on first use: importing them compiles nothing)."""
    return importlib.import_module("fastrit.kernels")
