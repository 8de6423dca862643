// GENERATED from kernels/nf4_code.py (fastrit's one NF4 table) by `python kernels/nf4_code.py > csrc/nf4_code.h`;
// do not edit by hand: change kernels/nf4_code.py and regenerate (tests/ops/test_nf4_code.py checks the two agree).
//
// The NF4 code table (bitsandbytes' 16 values, ascending; index = the 4-bit code), shared by the CPU and CUDA
// kernels. Every literal below is a float32 value written out in full, so it converts to exactly that float.
#pragma once

#define FASTRIT_NF4_CODE_VALUES \
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, \
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f, \
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f, \
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f

namespace fastrit {

constexpr float kNF4Code[16] = {FASTRIT_NF4_CODE_VALUES};

// Bucket boundary i (between codes i and i + 1), computed in float32 exactly as the reference does:
// (code[i] + code[i + 1]) / 2.
constexpr float nf4_midpoint(int i) { return (kNF4Code[i] + kNF4Code[i + 1]) / 2.0f; }

// bitsandbytes' CUDA quantizer compares against these 15 float32 constants (bit patterns, ascending), read
// off its compiled dQuantizeNF4 (sm_90 SASS of libbitsandbytes_cuda130.so); four are 1 ulp from the
// float32 midpoints above.
#define FASTRIT_NF4_CUDA_THRESHOLD_BITS \
    0xBF591CD9u, 0xBF1C5270u, 0xBEEB8480u, 0xBEADEA76u, 0xBE703CECu, 0xBE0D38BCu, 0xBD3A7871u, 0x3D22FAFFu, \
    0x3DF64863u, 0x3E5067E0u, 0x3E9582D4u, 0x3EC753F9u, 0x3F006D03u, 0x3F248DAFu, 0x3F5C89D9u

// The smallest absmax a block is scaled by (torch's clamp(min=1e-38) on a float32 tensor: the double
// 1e-38 rounded to float32, a subnormal).
constexpr float kNF4MinAbsmax = static_cast<float>(1e-38);

}  // namespace fastrit
