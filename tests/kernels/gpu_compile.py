"""Compile every GPU kernel of fastrit for NVIDIA targets without a GPU, and check what a GPU would reject.

The interpreter never runs the GPU-only code paths (native bf16/fp16 ``tl.dot``, the native bf16 cast, no FMA
contraction, inline PTX). This compiles, for each target architecture:

- every Triton kernel with **every** GPU autotune config (Triton IR -> PTX -> cubin), then runs Triton's own
  ``ptxas -v`` on the PTX and reads the register and spill counts;
- the CUDA kernels of csrc/cuda/ (device code only, ``nvcc -cubin -Xptxas -v``), when nvcc is on PATH;

and fails on any register spill, on a launch grid that exceeds a hardware limit (axis 0 < 2**31, axes 1 and 2
<= 65535) for the shapes of an 8B model, and on NF4 quantization code without the approximate reciprocal
(``rcp.approx.ftz.f32``) that bitsandbytes' CUDA quantizer uses. Run in a process where TRITON_INTERPRET is
unset (the kernels are then JITFunctions with their GPU configs):

    python -m tests.kernels.gpu_compile [ARCH ...]      # ARCH: 80, 90 (default: both)
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Llama-3-8B: intermediate 14336, hidden 4096, 128256 x 4096 embedding; up to 16 M rows (tokens x IG steps).
ROWS_8B, INTER_8B, HIDDEN_8B, STEPS_8B = 16 * 2**20, 14336, 4096, 512
LARGEST_WEIGHT_8B = 128256 * 4096
GRID_LIMITS = (2**31 - 1, 65535, 65535)
RCP = "rcp.approx.ftz.f32"


@dataclass
class Case:
    """One kernel with one specialisation: its signature, constexprs, and its launch grids at 8B shapes."""

    name: str
    autotuned: object
    signature: dict
    constexprs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    grids: list = field(default_factory=list)  # grid functions of meta at the 8B shapes
    needs_rcp: bool = False
    configs: list | None = None  # the configs the autotuner keeps for this case (default: all of them)


def _cases(kernels) -> list[Case]:
    ig, swiglu, sparse, nf4 = kernels.ig, kernels.swiglu, kernels.sparse_grad, kernels.nf4
    n, i, h = ROWS_8B, INTER_8B, HIDDEN_8B
    cases = []
    for dt in ("bf16", "fp32"):
        p = PTR[dt]
        cases.append(Case(
            f"ig_interpolate {dt}", ig.ig_interpolate_kernel,
            {"base": p, "direction": p, "alphas": "*fp32", "out": p, "ND": "i64", "M": "i32", "ND_BUCKET": "i64"},
            options={"enable_fp_fusion": False},
            grids=[ig.ig_interpolate_grid(n * i, STEPS_8B)],
        ))
    # the sparse gradients: same dtypes (tensor cores for bf16, FMA for fp32), and bf16 x fp32 (upcast)
    for g, x, upcast in (("bf16", "bf16", False), ("fp32", "fp32", False), ("bf16", "fp32", True)):
        configs = sparse.configs_for(upcast or g == "fp32")
        cases.append(Case(
            f"row_sparse_grad {g} x {x}", sparse.row_sparse_grad_kernel,
            {"grad_out": PTR[g], "x": PTR[x], "rows": "*i64", "out": PTR[x], "N": "i32", "OUT_F": "i32",
             "IN_F": "i32", "K": "i32", "N_BUCKET": "i32"},
            {"UPCAST": upcast},
            grids=[sparse.row_sparse_grad_grid(h, i), sparse.row_sparse_grad_grid(i, h)],
            configs=configs,
        ))
        cases.append(Case(
            f"col_sparse_grad {g} x {x}", sparse.col_sparse_grad_kernel,
            {"grad_out": PTR[g], "h": PTR[x], "cols": "*i64", "out": PTR[x], "N": "i32", "H": "i32", "INTER": "i32",
             "K": "i32", "N_BUCKET": "i32"},
            {"UPCAST": upcast},
            grids=[sparse.col_sparse_grad_grid(h, i), sparse.col_sparse_grad_grid(i, h)],
            configs=configs,
        ))
    for dt in ("bf16", "fp32"):
        p = PTR[dt]
        cases.append(Case(
            f"ig_linear_act {dt}", ig.ig_linear_act_kernel,
            {"summed": "*fp32", "weight": p, "act": p, "out": "*fp32", "N": "i32", "H": "i32", "INTER": "i32",
             "N_BUCKET": "i32"},
            grids=[ig.ig_linear_act_grid(n, i)],
        ))
    p = PTR["bf16"]
    cases.append(Case(
        "ig_weighted_sum bf16", ig.ig_weighted_sum_kernel,
        {"grads": p, "weights": "*fp32", "act": p, "out": "*fp32", "NI": "i64", "M": "i32", "NI_BUCKET": "i64"},
        {"HAS_ACT": True},
        grids=[ig.ig_weighted_sum_grid(n * i), ig.ig_weighted_sum_grid(n * h)],
    ))
    for has_keep in (True, False):
        cases.append(Case(
            f"swiglu_fwd bf16 keep={has_keep}", swiglu.swiglu_fwd_kernel,
            {"gate": p, "up": p, "keep": "*u8", "out": p, "N": "i32", "INTER": "i32", "N_BUCKET": "i32"},
            {"HAS_KEEP": has_keep},
            grids=[swiglu.swiglu_grid(n, i)],
        ))
        cases.append(Case(
            f"swiglu_bwd bf16 keep={has_keep}", swiglu.swiglu_bwd_kernel,
            {"grad_out": "*fp32", "gate": p, "up": p, "keep": "*u8", "d_gate": p, "d_up": p, "N": "i32",
             "INTER": "i32", "N_BUCKET": "i32"},
            {"HAS_KEEP": has_keep},
            grids=[swiglu.swiglu_grid(n, i)],
        ))
    for dt in ("bf16", "fp32"):
        for blocksize in (32, 64, 4096):  # bitsandbytes' smallest, its default, its largest
            chunk = min(blocksize // 2, nf4._CHUNK)
            cases.append(Case(
                f"nf4_quantize {dt} blocksize={blocksize}", nf4.nf4_quantize_kernel,
                {"x": PTR[dt], "thresholds": "*fp32", "packed": "*u8", "absmax": "*fp32", "NUMEL": "i64",
                 "FULL": "i64", "N_BLOCKS": "i64", "NUMEL_BUCKET": "i64"},
                {"BLOCKSIZE": blocksize, "CHUNK": chunk, "CUDA_RULE": True},
                grids=[nf4.nf4_quantize_grid(-(-LARGEST_WEIGHT_8B // blocksize))],
                needs_rcp=True,
            ))
        cases.append(Case(
            f"nf4_dequantize {dt}", nf4.nf4_dequantize_kernel,
            {"packed": "*u8", "absmax": "*fp32", "code": "*fp32", "out": PTR[dt], "NUMEL": "i64",
             "NUMEL_BUCKET": "i64"},
            {"BLOCKSIZE": 64, "CUDA_RULE": True},
            grids=[nf4.nf4_dequantize_grid(LARGEST_WEIGHT_8B)],
        ))
    return cases


def _ptxas_report(ptxas: str, ptx: str, arch: int) -> tuple[int, int]:
    """``(registers, spill bytes)`` that ``ptxas -v`` reports for ``ptx`` on sm_``arch``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        run = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    return _parse_ptxas(run.stdout + run.stderr)[0]


def _parse_ptxas(log: str) -> list[tuple[int, int]]:
    """``(registers, spill bytes)`` per kernel in a ``ptxas -v`` log."""
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    assert len(spills) == len(regs) and regs, log[-2000:]
    return list(zip(regs, spills, strict=True))


def _lacks_rcp(ptx: str, kernel: str) -> bool:
    """Whether ``ptx`` has no entry named like ``kernel``, or one of them runs no ``rcp.approx.ftz.f32``."""
    entries = re.findall(rf"\.entry \w*{kernel}\w*\(.*?\n}}\n", ptx, re.S)
    return not entries or any(RCP not in entry for entry in entries)


def _grid_faults(case: Case, meta: dict) -> list[str]:
    faults = []
    for grid in case.grids:
        dims = grid(meta)
        for axis, (size, limit) in enumerate(zip(dims, GRID_LIMITS[: len(dims)], strict=True)):
            if size > limit:
                faults.append(f"{case.name} {meta}: grid axis {axis} = {size} > {limit} at 8B shapes")
    return faults


def check_triton(arch: int) -> tuple[list[str], list[str]]:
    """``(report lines, faults)`` for every Triton kernel and GPU config on sm_``arch``."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: under the interpreter there is nothing to compile")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from fastrit import kernels

    ptxas = get_ptxas(arch).path
    lines, faults = [], []
    for case in _cases(kernels):
        jit = case.autotuned.fn
        for config in case.configs or case.autotuned.configs:
            constexprs = {**config.kwargs, **case.constexprs}
            signature = {**case.signature, **dict.fromkeys(constexprs, "constexpr")}
            signature = {arg: signature[arg] for arg in jit.arg_names}
            opts = {"num_warps": config.num_warps, "num_stages": config.num_stages, **case.options}
            compiled = triton.compile(
                ASTSource(jit, signature, constexprs), target=GPUTarget("cuda", arch, 32), options=opts
            )
            regs, spill = _ptxas_report(ptxas, compiled.asm["ptx"], arch)
            label = f"{case.name} {config.kwargs} warps={config.num_warps} stages={config.num_stages}"
            lines.append(f"triton sm_{arch} {label}: {regs} registers, {spill} bytes spilled")
            if spill:
                faults.append(f"triton sm_{arch} {label}: {spill} bytes spilled")
            if case.needs_rcp and _lacks_rcp(compiled.asm["ptx"], jit.__name__):
                faults.append(f"triton sm_{arch} {label}: no {RCP} in the PTX")
            faults += _grid_faults(case, config.all_kwargs())
    return lines, faults


def _nvcc_flags() -> list[str] | None:
    """Include flags for csrc/cuda/*.cu (torch, the toolkit, the CUDA wheels, Python), or None without nvcc."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    import sysconfig

    sys.path.insert(0, ROOT)
    try:
        from build_cuda import nvidia_wheel_includes, toolkit_root_from_nvcc
    finally:
        sys.path.pop(0)
    toolkit = toolkit_root_from_nvcc(nvcc)
    if toolkit and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = toolkit  # read once, when torch.utils.cpp_extension is imported
    import torch
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    includes = [os.path.join(ROOT, "csrc"), *include_paths("cuda")]
    if toolkit:
        includes.append(os.path.join(toolkit, "include"))
    includes += nvidia_wheel_includes(torch.version.cuda.split(".")[0]) + [sysconfig.get_paths()["include"]]
    # the flags setup.py's build uses (torch's common ones, -O3), without the host-only ones
    return [nvcc, "-std=c++20", "-O3", *COMMON_NVCC_FLAGS, "-DTORCH_EXTENSION_NAME=_C",
            "-DFASTRIT_CUDA_PTX_ARCH=90", *[f"-I{path}" for path in includes]]


def check_cuda(arch: int) -> tuple[list[str], list[str]]:
    """``(report lines, faults)`` for the CUDA kernels of csrc/cuda/ on sm_``arch`` (nothing without nvcc)."""
    flags = _nvcc_flags()
    if flags is None:
        return ["nvcc not on PATH: CUDA kernels not checked"], []
    lines, faults, ptx = [], [], ""
    for source in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        with tempfile.TemporaryDirectory() as tmp:
            run = subprocess.run(
                [*flags, "-cubin", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-keep",
                 f"-keep-dir={tmp}", "-o", os.path.join(tmp, "out.cubin"), source],
                capture_output=True, text=True,
            )
            if run.returncode:
                faults.append(f"nvcc sm_{arch} {os.path.basename(source)} failed:\n{run.stderr[-3000:]}")
                continue
            ptx += "".join(open(path).read() for path in glob.glob(os.path.join(tmp, "*.ptx")))
        names = re.findall(r"Compiling entry function '(\w+)'", run.stdout + run.stderr)
        for name, (regs, spill) in zip(names, _parse_ptxas(run.stdout + run.stderr), strict=True):
            lines.append(f"cuda sm_{arch} {name}: {regs} registers, {spill} bytes spilled")
            if spill:
                faults.append(f"cuda sm_{arch} {name}: {spill} bytes spilled")
    # the NF4 quantizer's PTX (one file of csrc/cuda/ holds it): its entries and the reciprocal they must use
    if _lacks_rcp(ptx, "nf4_quantize_kernel"):
        faults.append(f"cuda sm_{arch}: nf4_quantize_kernel without {RCP} in its PTX")
    return lines, faults


def check_all(archs: list[int]) -> tuple[list[str], list[str]]:
    lines, faults = [], []
    for arch in archs:
        for check in (check_triton, check_cuda):
            more_lines, more_faults = check(arch)
            lines += more_lines
            faults += more_faults
    return lines, faults


if __name__ == "__main__":
    report, problems = check_all([int(a) for a in sys.argv[1:]] or [80, 90])
    print("\n".join(report))
    if problems:
        print("\nFAULTS:\n" + "\n".join(problems))
        sys.exit(1)
