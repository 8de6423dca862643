"""The NF4 code table, in one place: bitsandbytes' 16 code values and its CUDA quantizer's 15 thresholds.

Plain Python (no torch, no triton), so that every floor may import it: the Triton kernels (``kernels/nf4.py``), the
PyTorch oracle (``fastrit.ops.reference``) and ``fastrit.nn``. The C++/CUDA kernels read ``csrc/nf4_code.h``,
generated from this module (``python kernels/nf4_code.py > csrc/nf4_code.h``: a plain script, it needs nothing
installed) and checked against it by tests/ops/test_nf4_code.py.

Every value is a float32 written out in full (the shortest decimal that reads back as that float32), so the same
text converts to the same float32 in Python (``torch.tensor(..., dtype=torch.float32)``), Triton and C++.
"""

from __future__ import annotations

import sys

__all__ = ["NF4_CODE", "NF4_CUDA_THRESHOLDS", "c_header"]

#: The 16 NF4 code values (bitsandbytes' table, ascending; index = the 4-bit code).
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

#: The 15 bucket thresholds of bitsandbytes' CUDA quantizer, as float32 bit patterns (ascending): the immediates its
#: compiled ``dQuantizeNF4`` compares against (four are 1 ulp off the float32 midpoints of NF4_CODE).
NF4_CUDA_THRESHOLDS = (
    0xBF591CD9, 0xBF1C5270, 0xBEEB8480, 0xBEADEA76, 0xBE703CEC, 0xBE0D38BC, 0xBD3A7871, 0x3D22FAFF,
    0x3DF64863, 0x3E5067E0, 0x3E9582D4, 0x3EC753F9, 0x3F006D03, 0x3F248DAF, 0x3F5C89D9,
)  # fmt: skip

_HEADER = """\
// GENERATED from kernels/nf4_code.py (fastrit's one NF4 table) by `python kernels/nf4_code.py > csrc/nf4_code.h`;
// do not edit by hand: change kernels/nf4_code.py and regenerate (tests/ops/test_nf4_code.py checks the two agree).
//
// The NF4 code table (bitsandbytes' 16 values, ascending; index = the 4-bit code), shared by the CPU and CUDA
// kernels. Every literal below is a float32 value written out in full, so it converts to exactly that float.
#pragma once

#define FASTRIT_NF4_CODE_VALUES {code}

namespace fastrit {{

constexpr float kNF4Code[16] = {{FASTRIT_NF4_CODE_VALUES}};

// Bucket boundary i (between codes i and i + 1), computed in float32 exactly as the reference does:
// (code[i] + code[i + 1]) / 2.
constexpr float nf4_midpoint(int i) {{ return (kNF4Code[i] + kNF4Code[i + 1]) / 2.0f; }}

// bitsandbytes' CUDA quantizer compares against these 15 float32 constants (bit patterns, ascending), read
// off its compiled dQuantizeNF4 (sm_90 SASS of libbitsandbytes_cuda130.so); four are 1 ulp from the
// float32 midpoints above.
#define FASTRIT_NF4_CUDA_THRESHOLD_BITS {thresholds}

// The smallest absmax a block is scaled by (torch's clamp(min=1e-38) on a float32 tensor: the double
// 1e-38 rounded to float32, a subnormal).
constexpr float kNF4MinAbsmax = static_cast<float>(1e-38);

}}  // namespace fastrit
"""


def _macro_body(items: list[str], per_line: int) -> str:
    """``items`` joined by commas, ``per_line`` to a line, continued with backslashes (a multi-line C macro body)."""
    lines = [", ".join(items[i : i + per_line]) for i in range(0, len(items), per_line)]
    return "\\\n    " + ", \\\n    ".join(lines)


def c_header() -> str:
    """The text of ``csrc/nf4_code.h``: :data:`NF4_CODE` as float literals (``repr`` plus ``f``: the shortest decimal
    of each value, which a C++ compiler rounds to the same float32) and :data:`NF4_CUDA_THRESHOLDS` as hex bit
    patterns."""
    code = [f"{value!r}f" for value in NF4_CODE]
    thresholds = [f"0x{bits:08X}u" for bits in NF4_CUDA_THRESHOLDS]
    return _HEADER.format(code=_macro_body(code, 4), thresholds=_macro_body(thresholds, 8))


if __name__ == "__main__":
    sys.stdout.write(c_header())
