"""Helpers shared by the Triton kernels: interpreter detection, autotune config lists, output casts.

Under ``TRITON_INTERPRET=1`` (the CPU interpreter, numpy underneath) two things differ from a GPU:

- autotuning would run every config, so each kernel gets a single small config there;
- bfloat16 is stored as raw ``uint16`` bits. Arithmetic on it or a ``tl.dot`` of bfloat16 blocks would
  operate on the bit patterns, and a float32 -> bfloat16 cast truncates instead of rounding to nearest
  even. The kernels therefore upcast every loaded block to float32 before arithmetic, upcast dot
  operands to float32 under the interpreter (exact: products of bf16/fp16 values fit in float32), and
  write bfloat16 outputs through :func:`cast_out`, which rounds to nearest even with integer operations
  under the interpreter (bit-identical to PyTorch's CPU cast) and uses the native cast on a GPU.
"""

from __future__ import annotations

import os

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
