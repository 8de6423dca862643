// AVX-512 loads and stores of 16 values between float32 registers and the storage dtypes, for the
// hand-written kernels (functions marked FASTRIT_AVX512, called only when cpu_has_avx512()).
#pragma once

#include "cpu/cpu_common.h"

#if FASTRIT_X86_64

// GCC 12 warns inside its own AVX-512 headers (the _mm512_undefined_* operand of the masked builtins,
// GCC bug 105593), a false positive. The warning is issued once functions are inlined, after a
// push/pop around the #include has ended, so it stays off for the files including this header.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

namespace fastrit::cpu {

FASTRIT_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

FASTRIT_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

FASTRIT_AVX512 inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

FASTRIT_AVX512 inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }

// Round to nearest even, NaN to the canonical quiet NaN: as store_f32<c10::BFloat16>.
FASTRIT_AVX512 inline void store16(c10::BFloat16* p, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}

// vcvtps2ph with round to nearest even: as c10::Half's conversion.
FASTRIT_AVX512 inline void store16(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

}  // namespace fastrit::cpu

#endif  // FASTRIT_X86_64
