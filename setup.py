"""fastrit: exact neuron Integrated Gradients and neuron-guided tuning kernels.

Install torch first, then this package with ``pip install --no-build-isolation -e .`` so that
anything compiled here builds against the torch already in the environment.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_root_from_nvcc(nvcc: str) -> str | None:
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


def _nvidia_wheel_includes(cuda_major: str) -> list[str]:
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


def _extensions() -> tuple[list, dict]:
    """``fastrit._C`` (C++ CPU kernels, plus CUDA kernels when torch and nvcc allow), or nothing.

    Environment: FASTRIT_BUILD_EXT=0 skips the extension; FASTRIT_BUILD_CUDA=0 builds the CPU part
    only; TORCH_CUDA_ARCH_LIST defaults to "8.0;8.6;9.0"; MAX_JOBS (parallel compiles) to 2.
    """
    if os.environ.get("FASTRIT_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        import torch
    except ImportError:
        print("fastrit: torch is not importable, building without the fastrit._C extension", file=sys.stderr)
        return [], {}

    nvcc = shutil.which("nvcc")
    with_cuda = bool(torch.version.cuda) and os.environ.get("FASTRIT_BUILD_CUDA", "1") != "0"
    if with_cuda and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        root = _toolkit_root_from_nvcc(nvcc) if nvcc else None
        if root is None:
            with_cuda = False
        else:
            # Must happen before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
            os.environ["CUDA_HOME"] = root
    os.environ.setdefault("MAX_JOBS", "2")

    from torch.utils import cpp_extension

    with_cuda = with_cuda and cpp_extension.CUDA_HOME is not None

    def relative(pattern: str) -> list[str]:
        return sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, pattern)))

    sources = ["csrc/ops.cpp", *relative("csrc/cpu/*.cpp")]
    # No -ffast-math anywhere, and no FMA contraction on the CPU: NF4 and ig_interpolate are bit-exact
    # with the PyTorch reference, which rounds every multiply and add on its own.
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    kwargs = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;9.0")
        sources += relative("csrc/cuda/*.cu")
        wheel_includes = _nvidia_wheel_includes(torch.version.cuda.split(".")[0])
        # The toolkit's own headers first, the wheels' only for what the toolkit lacks (cusparse.h, ...).
        kwargs["include_dirs"] += [os.path.join(cpp_extension.CUDA_HOME, "include"), *wheel_includes]
        # nvcc: no --use_fast_math (NF4 must stay bit-exact).
        kwargs["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]}
        extension = cpp_extension.CUDAExtension("fastrit._C", sources, **kwargs)
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx_flags}
        extension = cpp_extension.CppExtension("fastrit._C", sources, **kwargs)
    return [extension], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


EXT_MODULES, CMDCLASS = _extensions()

setup(
    name="fastrit",
    version="0.1.0",
    description="Neuron-level Integrated Gradients and neuron-guided tuning for RAG language models, fast on one GPU",
    python_requires=">=3.10",
    packages=["fastrit", "fastrit.attribution", "fastrit.ops", "fastrit.kernels"],
    package_dir={"fastrit.kernels": "kernels"},
    install_requires=[
        "torch>=2.6,<=2.14.1",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "numpy>=1.24",
        "bitsandbytes>=0.45",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "captum>=0.7",
            "accelerate>=1.1",  # transformers needs it to load bitsandbytes 4-bit models
            "matplotlib>=3.7",
            "ruff>=0.5",
        ],
    },
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
