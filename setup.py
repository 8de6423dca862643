"""fastrit: exact neuron Integrated Gradients and neuron-guided tuning kernels.

Install torch first, then this package with ``pip install --no-build-isolation -e .`` so that
anything compiled here builds against the torch already in the environment.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
from build_cuda import nvidia_wheel_includes, ptx_arch, resolve_arch_list, toolkit_root_from_nvcc  # noqa: E402


def _extensions() -> tuple[list, dict]:
    """``fastrit._C`` (C++ CPU kernels, plus CUDA kernels when torch and nvcc allow), or nothing.

    Environment: FASTRIT_BUILD_EXT=0 skips the extension; FASTRIT_BUILD_CUDA=0 builds the CPU part
    only; TORCH_CUDA_ARCH_LIST defaults to the visible GPUs' architectures, or to "8.0;8.6;9.0+PTX" without
    a GPU, and always gets PTX of its newest architecture (build_cuda.resolve_arch_list); MAX_JOBS (parallel
    compiles) defaults to 2.
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
        root = toolkit_root_from_nvcc(nvcc) if nvcc else None
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
    # with the PyTorch reference, which rounds every multiply and add on its own. -fno-trapping-math lets GCC
    # turn the float compares of branch-free code (exp_f32's clamps) into selects, so those loops vectorise;
    # it changes no result (nothing here reads the floating-point exception flags).
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
    kwargs = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        visible = [torch.cuda.get_device_capability(d) for d in range(torch.cuda.device_count())]
        arch_list = resolve_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"), visible)
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        print(f"fastrit: building CUDA kernels for TORCH_CUDA_ARCH_LIST={arch_list}", file=sys.stderr)
        sources += relative("csrc/cuda/*.cu")
        wheel_includes = nvidia_wheel_includes(torch.version.cuda.split(".")[0])
        # The toolkit's own headers first, the wheels' only for what the toolkit lacks (cusparse.h, ...).
        kwargs["include_dirs"] += [os.path.join(cpp_extension.CUDA_HOME, "include"), *wheel_includes]
        # nvcc: no --use_fast_math (NF4 must stay bit-exact).
        # the architecture built as PTX, which fastrit.backends() reads back (the SASS ones: __CUDA_ARCH_LIST__)
        nvcc_flags = ["-O3", "-lineinfo", f"-DFASTRIT_CUDA_PTX_ARCH={ptx_arch(arch_list)}"]
        kwargs["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": nvcc_flags}
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
    # every package under fastrit/ (a list written by hand had lost fastrit.nn and fastrit.tuning: only an
    # editable install worked), and the Triton kernels, installed as fastrit.kernels
    packages=[*find_packages(include=["fastrit", "fastrit.*"]), "fastrit.kernels"],
    entry_points={"console_scripts": ["fastrit = fastrit.cli:main"]},
    package_data={"fastrit.demo": ["reader/*.json", "reader/*.safetensors"]},
    package_dir={"fastrit.kernels": "kernels"},
    install_requires=[
        "torch>=2.6,<=2.14.1",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "numpy>=1.24",
        "bitsandbytes>=0.45",
        "datasets>=3.0",
        "accelerate>=1.1",  # transformers needs it to load bitsandbytes 4-bit models
        "matplotlib>=3.7",
        "peft>=0.13",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "captum>=0.7",
            # the oracle of fastrit.compat.KnowledgeNeurons (its released 0.0.2, with its dependency einops)
            "knowledge-neurons==0.0.2",
            "einops>=0.6",
            "ruff>=0.5",
            # tests/real: the real pretrained model (SmolLM2-135M-Instruct) ships as a GGUF file
            "gguf>=0.10",
        ],
        # fastrit.models.load_causal_lm / --model of a .gguf file (transformers' GGUF reader needs it)
        "gguf": ["gguf>=0.10"],
    },
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
