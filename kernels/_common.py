"""Helpers shared by the Triton kernels: interpreter detection, autotune config lists, output casts.

Under ``TRITON_INTERPRET=1`` (the CPU interpreter, numpy underneath) two things differ from a GPU:

- autotuning would run every config, so each kernel gets a single small config there;
- bfloat16 is stored as raw ``uint16`` bits. Arithmetic on it or a ``tl.dot`` of bfloat16 blocks would
  operate on the bit patterns, and a float32 -> bfloat16 cast truncates instead of rounding to nearest
  even. The kernels therefore upcast every loaded block to float32 before arithmetic, upcast dot
  operands to float32 under the interpreter (exact: products of bf16/fp16 values fit in float32), and
  write bfloat16 outputs through :func:`cast_out`, which rounds to nearest even with integer operations
  under the interpreter (bit-identical to PyTorch's CPU cast) and uses the native cast on a GPU.

Also here: the launch context (:func:`on_device`: kernels launch on their tensors' device, not the current
one), the autotune key for row counts (:func:`size_bucket`), and the flush-to-zero arithmetic of bitsandbytes'
CUDA kernels (:func:`flush_subnormal`, :func:`mul_ftz`, :func:`rcp_approx_ftz`).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: Whether @triton.jit functions run under the interpreter (decided at import, as triton.jit does).
INTERPRET: bool = _interpreting()
_INTERPRET = tl.constexpr(INTERPRET)


def autotune_configs(gpu: list[triton.Config], interpret: triton.Config) -> list[triton.Config]:
    """The autotune list of a kernel: ``gpu`` on a GPU, only ``interpret`` under the interpreter."""
    return [interpret] if INTERPRET else gpu


@triton.jit
def cast_out(b_x, DTYPE: tl.constexpr):
    """``b_x`` (float32) cast to ``DTYPE`` with round-to-nearest-even, also for bfloat16 under the interpreter."""
    if _INTERPRET and DTYPE == tl.bfloat16:
        b_bits = b_x.to(tl.uint32, bitcast=True)
        b_round = (b_bits >> 16) & 1
        b_hi = ((b_bits + 0x7FFF + b_round) >> 16).to(tl.uint16)
        b_hi = tl.where(b_x != b_x, 0x7FC0, b_hi).to(tl.uint16)
        return b_hi.to(tl.bfloat16, bitcast=True)
    else:
        return b_x.to(DTYPE)


def size_bucket(n: int) -> int:
    """``n`` rounded up to a power of two: the autotune key for a row or element count.

    Keying on the count itself would re-benchmark every config for every new sequence length; a bucket keeps
    the choice within a factor of two of the size it was tuned for.
    """
    return triton.next_power_of_2(max(int(n), 1))


def on_device(launcher):
    """Run ``launcher`` with its first tensor argument's CUDA device current.

    Triton launches on the current device and its stream; tensors on another GPU would be read at addresses
    that are not theirs there. CPU tensors (the interpreter) run as they are.
    """

    @functools.wraps(launcher)
    def wrapped(*args, **kwargs):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        guard = torch.cuda.device(device) if device is not None and device.type == "cuda" else contextlib.nullcontext()
        with guard:
            return launcher(*args, **kwargs)

    return wrapped


@triton.jit
def flush_subnormal(b_x):
    """float32 ``b_x`` with subnormals replaced by a zero of the same sign (what FTZ does to an operand)."""
    b_bits = b_x.to(tl.uint32, bitcast=True)
    return tl.where((b_bits & 0x7F800000) == 0, (b_bits & 0x80000000).to(tl.float32, bitcast=True), b_x)


@triton.jit
def mul_ftz(b_a, b_b):
    """float32 ``b_a * b_b`` rounded to nearest, subnormal operands and result flushed (``mul.rn.ftz.f32``)."""
    if _INTERPRET:
        b_a = flush_subnormal(b_a)
        b_b = flush_subnormal(b_b)
        # 0 * inf is NaN, made here without numpy's "invalid value" warning
        b_nan = ((b_a == 0.0) & (tl.abs(b_b) == float("inf"))) | ((b_b == 0.0) & (tl.abs(b_a) == float("inf")))
        b_prod = tl.where(b_nan, 0.0, b_a) * tl.where(b_nan, 0.0, b_b)
        return tl.where(b_nan, float("nan"), flush_subnormal(b_prod))
    else:
        return tl.inline_asm_elementwise(
            "mul.rn.ftz.f32 $0, $1, $2;", "=r,r,r", [b_a, b_b], dtype=tl.float32, is_pure=True, pack=1
        )


@triton.jit
def rcp_approx_ftz(b_x):
    """float32 ``1 / b_x`` as the GPU's ``rcp.approx.ftz.f32`` (the instruction bitsandbytes' CUDA NF4
    quantizer runs): 1 / 0 = inf, subnormal operand and result flushed. The interpreter cannot run PTX: there
    it is the correctly rounded reciprocal, flushed, which differs from the GPU's by at most an ulp."""
    if _INTERPRET:
        b_x = flush_subnormal(b_x)
        b_zero = b_x == 0.0
        b_inv = tl.div_rn(tl.full(b_x.shape, 1.0, tl.float32), tl.where(b_zero, 1.0, b_x))
        return tl.where(b_zero, float("inf"), flush_subnormal(b_inv))
    else:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [b_x], dtype=tl.float32, is_pure=True, pack=1
        )
