"""Which backends exist, why not, and which one an op call uses.

``"auto"`` picks cuda, then triton, on CUDA tensors and cpp, then torch, on CPU tensors. The cuda backend
counts as available on a device only when the extension holds kernels that device can run: SASS of its
architecture (same major version, minor not above the device's) or PTX of an architecture not above it,
which the driver compiles. Nothing here initialises CUDA or compiles a kernel at import time.
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


@functools.cache
def cuda_build_archs() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(SASS architectures, PTX architectures)`` the extension's CUDA kernels were compiled for (e.g.
    ``((80, 86, 90), (90,))``); empty without CUDA kernels."""
    if extension_status() != "loaded" or not hasattr(torch.ops.fastrit, "cuda_archs"):
        return (), ()
    sass, ptx = torch.ops.fastrit.cuda_archs()
    return tuple(sass), tuple(ptx)


def _arch_names(archs: tuple[int, ...], prefix: str) -> str:
    return ", ".join(f"{prefix}_{a}" for a in archs) or "none"


def cuda_kernels_run_on(capability: tuple[int, int], sass: tuple[int, ...], ptx: tuple[int, ...]) -> str:
    """``"available"`` if kernels built as ``sass`` / ``ptx`` architectures run on a GPU of ``capability``,
    else the reason (the architectures built and the device's)."""
    major, minor = capability
    device = 10 * major + minor
    if any(a // 10 == major and a % 10 <= minor for a in sass) or any(a <= device for a in ptx):
        return "available"
    return (
        f"the extension's CUDA kernels were built for {_arch_names(sass, 'sm')} (SASS) and "
        f"{_arch_names(ptx, 'compute')} (PTX), none of which runs on this GPU (compute capability "
        f"{major}.{minor}); rebuild with TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\""
    )


def _cuda_status(device: torch.device | None) -> str:
    ext = extension_status()
    if ext != "loaded":
        return ext
    if not _has_kernel("CUDA"):
        return "extension built without CUDA kernels"
    if not torch.cuda.is_available():
        return "compiled, no CUDA device"
    index = device.index if device is not None and device.type == "cuda" else None
    return cuda_kernels_run_on(torch.cuda.get_device_capability(index), *cuda_build_archs())


def backends(device: torch.device | str | None = None) -> dict[str, str]:
    """For each backend name, ``"available"`` or the reason it is not.

    ``device``: the CUDA device the cuda backend must run on (default: the current one).
    """
    device = torch.device(device) if isinstance(device, str) else device
    status = {"torch": "available", "triton": _triton_status()}
    ext = extension_status()
    if ext != "loaded":
        status["cpp"] = ext
    else:
        status["cpp"] = "available" if _has_kernel("CPU") else "no CPU kernels in the extension"
    status["cuda"] = _cuda_status(device)
    return status


def choose(backend: str, device: torch.device) -> str:
    """The backend an op on ``device`` runs with; ValueError naming ``backend`` if it cannot."""
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"backend: expected one of auto, {', '.join(BACKENDS)}, got {backend!r}")
    status = backends(device)
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


#: :func:`choose`'s answers by (backend, device, TRITON_INTERPRET): an op is called hundreds of times per training
#: step, and what is installed does not change while a process runs; :func:`clear_choices` forgets them
_CHOICES: dict[tuple, str] = {}


def clear_choices() -> None:
    """Forget the backends :func:`dispatch` has chosen (after changing what :func:`backends` would report)."""
    _CHOICES.clear()


def chosen(backend: str, device: torch.device) -> str:
    """:func:`choose`, asked once per backend, device and TRITON_INTERPRET setting (errors are not cached)."""
    key = (backend, device.type, device.index, os.environ.get("TRITON_INTERPRET"))
    name = _CHOICES.get(key)
    if name is None:
        name = _CHOICES[key] = choose(backend, device)
    return name


def dispatch(op: str, backend: str, device: torch.device, reference_fn, *args):
    """Run ``op`` on ``args`` with the backend :func:`choose` picks (asked once per backend and device:
    :func:`chosen`): ``reference_fn`` (torch), the Triton launcher ``fastrit.kernels.<op>_fwd``, or
    ``torch.ops.fastrit.<op>`` (cpp and cuda)."""
    name = chosen(backend, device)
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
