"""Compile fastrit's Triton kernels for an NVIDIA GPU target without a GPU (Triton IR -> PTX -> cubin).

The interpreter never runs the GPU-only code paths (native bf16/fp16 ``tl.dot``, the native bf16 cast, no FMA
contraction, ``div_rn``); this compiles them with the first GPU autotune config of every kernel, using the
ptxas shipped with Triton. Run in a process where TRITON_INTERPRET is unset (the kernels are then JITFunctions):

    python -m tests.kernels.gpu_compile [ARCH]      # ARCH: 90 (default) or 80, ...
"""

from __future__ import annotations

import os
import sys

PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}


def _cases(kernels):
    """``(name, autotuned kernel, signature without constexprs, extra constexprs, extra options)``."""
    ig, swiglu, sparse, nf4 = kernels.ig, kernels.swiglu, kernels.sparse_grad, kernels.nf4
    for dt in ("bf16", "fp32"):
        p = PTR[dt]
        yield (
            f"ig_interpolate {dt}",
            ig.ig_interpolate_kernel,
            {"base": p, "direction": p, "alphas": "*fp32", "out": p, "ND": "i32", "M": "i32"},
            {},
            {"enable_fp_fusion": False},
        )
        yield (
            f"row_sparse_grad {dt}",
            sparse.row_sparse_grad_kernel,
            {"grad_out": p, "x": p, "rows": "*i64", "out": p, "N": "i32", "OUT_F": "i32", "IN_F": "i32", "K": "i32"},
            {"UPCAST": False},
            {},
        )
    p = PTR["bf16"]
    yield (
        "ig_weighted_sum bf16",
        ig.ig_weighted_sum_kernel,
        {"grads": p, "weights": "*fp32", "act": p, "out": "*fp32", "NI": "i32", "M": "i32"},
        {"HAS_ACT": True},
        {},
    )
    yield (
        "ig_linear_act bf16",
        ig.ig_linear_act_kernel,
        {"summed": "*fp32", "weight": p, "act": p, "out": "*fp32", "N": "i32", "H": "i32", "INTER": "i32"},
        {},
        {},
    )
    yield (
        "swiglu_fwd bf16",
        swiglu.swiglu_fwd_kernel,
        {"gate": p, "up": p, "keep": "*u8", "out": p, "N": "i32", "INTER": "i32"},
        {"HAS_KEEP": True},
        {},
    )
    yield (
        "swiglu_bwd bf16",
        swiglu.swiglu_bwd_kernel,
        {"grad_out": p, "gate": p, "up": p, "keep": "*u8", "d_gate": p, "d_up": p, "N": "i32", "INTER": "i32"},
        {"HAS_KEEP": True},
        {},
    )
    yield (
        "col_sparse_grad bf16",
        sparse.col_sparse_grad_kernel,
        {"grad_out": p, "h": p, "cols": "*i64", "out": p, "N": "i32", "H": "i32", "INTER": "i32", "K": "i32"},
        {"UPCAST": False},
        {},
    )
    yield (
        "nf4_quantize bf16",
        nf4.nf4_quantize_kernel,
        {"x": p, "midpoints": "*fp32", "packed": "*u8", "absmax": "*fp32", "NUMEL": "i32", "FULL": "i32",
         "N_BLOCKS": "i32"},
        {"BLOCKSIZE": 64, "HALF": 32},
        {},
    )
    yield (
        "nf4_dequantize bf16",
        nf4.nf4_dequantize_kernel,
        {"packed": "*u8", "absmax": "*fp32", "code": "*fp32", "out": p, "NUMEL": "i32"},
        {"BLOCKSIZE": 64},
        {},
    )


def compile_all(arch: int = 90) -> list[str]:
    """Compile every case for ``cuda`` sm_``arch``; returns one line per kernel (raises on the first failure)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: under the interpreter there is nothing to compile")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastrit import kernels

    lines = []
    for name, autotuned, signature, constexprs, options in _cases(kernels):
        config = autotuned.configs[0]
        jit = autotuned.fn
        constexprs = {**config.kwargs, **constexprs}
        signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
        signature = {arg: signature[arg] for arg in jit.arg_names}
        opts = {"num_warps": config.num_warps, "num_stages": config.num_stages, **options}
        compiled = triton.compile(
            ASTSource(jit, signature, constexprs), target=GPUTarget("cuda", arch, 32), options=opts
        )
        assert compiled.asm.get("cubin"), name
        lines.append(f"{name}: sm_{arch} cubin {len(compiled.asm['cubin'])} bytes, shared {compiled.metadata.shared}")
    return lines


if __name__ == "__main__":
    for line in compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90):
        print(line)
