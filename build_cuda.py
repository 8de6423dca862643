"""Where the CUDA toolkit is and which GPU architectures to build for: shared by setup.py and the compile guard
(tests/kernels/gpu_compile.py). Plain functions, no torch import at module level.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig

#: what is built when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible: A100, RTX 30xx/A10/A40, H100/H200,
#: and PTX of the newest, which the driver compiles for any later GPU
DEFAULT_ARCH_LIST = "8.0;8.6;9.0+PTX"


def toolkit_root_from_nvcc(nvcc: str) -> str | None:
    """The CUDA toolkit root as nvcc itself sees it (the ``TOP=`` line of a dry run).

    The ``nvcc`` on PATH may be a wrapper script elsewhere; torch would then guess CUDA_HOME as the
    wrapper's grandparent folder, which holds no libcudart.
    """
    try:
        run = subprocess.run(
            [nvcc, "--dryrun", "-v", "-x", "cu", "-c", os.devnull],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (run.stdout + run.stderr).splitlines():
        match = re.match(r"^#\$\s*TOP=(.+)$", line.strip())
        if match:
            return os.path.realpath(match.group(1).strip())
    return None


def nvidia_wheel_includes(cuda_major: str) -> list[str]:
    """Include folders of the pip-installed CUDA wheels (``nvidia/cu<major>/include``).

    torch's CUDA headers include cusparse.h, cublas_v2.h, ...; a bare toolkit may lack them while the
    wheels torch depends on ship them.
    """
    roots = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path]
    includes: list[str] = []
    for root in dict.fromkeys(roots):
        include = os.path.realpath(os.path.join(root or ".", "nvidia", f"cu{cuda_major}", "include"))
        if os.path.isdir(include) and include not in includes:
            includes.append(include)
    return includes


def _arch_key(arch: str) -> tuple[int, int] | None:
    """``(major, minor)`` of ``"9.0"``, ``"9.0a"``, ``"8.6+PTX"``; None for a name such as ``"Hopper"``."""
    match = re.fullmatch(r"(\d+)\.(\d+)[af]?(\+PTX)?", arch)
    return (int(match.group(1)), int(match.group(2))) if match else None


def resolve_arch_list(requested: str | None, visible: list[tuple[int, int]]) -> str:
    """The TORCH_CUDA_ARCH_LIST to build: ``requested`` (the variable as the user set it) or, when unset, the
    visible GPUs' capabilities, or :data:`DEFAULT_ARCH_LIST` without a GPU. PTX of the newest architecture is
    always added (``+PTX``) so that a GPU newer than every listed one can still JIT the kernels.

    >>> resolve_arch_list("8.0;9.0", [])
    '8.0;9.0+PTX'
    >>> resolve_arch_list(None, [(8, 9), (8, 9)])
    '8.9+PTX'
    """
    if requested and requested.strip():
        archs = [a for a in re.split(r"[;\s]+", requested.strip()) if a]
    elif visible:
        archs = [f"{major}.{minor}" for major, minor in sorted(set(visible))]
    else:
        archs = DEFAULT_ARCH_LIST.split(";")
    keys = [_arch_key(a) for a in archs]
    if not any(a.endswith("+PTX") for a in archs) and None not in keys:
        archs[keys.index(max(keys))] += "+PTX"
    return ";".join(archs)


def ptx_arch(arch_list: str) -> int:
    """The newest architecture built as PTX that later GPUs can JIT, as a number (``"8.6;9.0+PTX"`` -> 90); 0 if
    none or not known. Architecture-specific PTX (``9.0a``) runs on that architecture only: it does not count."""
    ptx = [_arch_key(a) for a in re.split(r"[;\s]+", arch_list.strip()) if re.fullmatch(r"\d+\.\d+\+PTX", a)]
    return max((10 * key[0] + key[1] for key in ptx if key), default=0)
