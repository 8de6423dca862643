// Shared pieces of the CPU kernels: instruction-set multiversioning, float conversions of the three
// storage dtypes, a vectorisable exp, and the work split for at::parallel_for.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// The extension is compiled for the baseline ISA (x86-64: SSE2). Hot loops marked FASTRIT_CPU_CLONES
// are compiled three times more, for AVX-512, AVX2 and the baseline, and the loader picks the best the
// CPU supports (GCC/Clang target_clones, an ifunc). Only loops without calls out of line benefit:
// lambdas and non-inlined callees are not cloned.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define FASTRIT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FASTRIT_X86_64 1
#else
#define FASTRIT_CPU_CLONES
#define FASTRIT_X86_64 0
#endif

#define FASTRIT_ALWAYS_INLINE inline __attribute__((always_inline))

#if FASTRIT_X86_64
// Functions written with AVX-512 intrinsics; call them only when cpu_has_avx512().
#define FASTRIT_AVX512 __attribute__((target("avx512f")))
#endif

namespace fastrit::cpu {

// Whether this CPU (and OS) runs AVX-512F code.
inline bool cpu_has_avx512() {
#if FASTRIT_X86_64
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

// ---- float32 <-> storage dtype -------------------------------------------------------------------------
// Written on raw bits so that the compiler vectorises them; the rounding is the same as torch's .to()
// (round to nearest even; NaN stays NaN).

FASTRIT_ALWAYS_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

FASTRIT_ALWAYS_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

template <typename T>
FASTRIT_ALWAYS_INLINE float load_f32(const T& x) {
  return static_cast<float>(x);
}

template <>
FASTRIT_ALWAYS_INLINE float load_f32<c10::BFloat16>(const c10::BFloat16& x) {
  return bits_to_float(static_cast<uint32_t>(x.x) << 16);
}

template <typename T>
FASTRIT_ALWAYS_INLINE T store_f32(float f) {
  return static_cast<T>(f);
}

template <>
FASTRIT_ALWAYS_INLINE c10::BFloat16 store_f32<c10::BFloat16>(float f) {
  const uint32_t u = float_to_bits(f);
  // Round to nearest even on the 16 dropped bits; a NaN becomes the canonical quiet NaN.
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(f != f ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

// ---- exp ------------------------------------------------------------------------------------------------

// exp(x) for float32, branch-free so that loops calling it vectorise (std::exp does not, without
// -ffast-math, which NF4 forbids). exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 with ln 2
// split in two (Cody-Waite) so r is exact, exp(r) by Cephes' degree-6 polynomial (about 1 ulp; silu and
// sigmoid built on it measure as close to float64 truth as torch's own kernels). 2^n is applied as two normal powers of two, so results that underflow to subnormals or 0
// and overflow to inf come out right (x > 88.72 gives inf, x < -103.9 gives 0). NaN propagates.
FASTRIT_ALWAYS_INLINE float exp_f32(float x) {
  // Beyond these, exp is inf or 0 anyway; the clamp keeps n within what the two factors can hold.
  x = x > 89.0f ? 89.0f : x;
  x = x < -104.0f ? -104.0f : x;
  // Adding 1.5 * 2^23 rounds x / ln 2 to an integer held in the low mantissa bits of t.
  constexpr float kShift = 12582912.0f;
  const float t = x * 1.44269504088896341f + kShift;
  const float n = t - kShift;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // n (in [-150, 128]) from t's mantissa, split as n1 + n2 with both in [-75, 64], each 2^ni built in
  // the exponent field.
  const int32_t n_int = static_cast<int32_t>(float_to_bits(t) - float_to_bits(kShift));
  const int32_t n1 = n_int >> 1;
  const int32_t n2 = n_int - n1;
  const float scale1 = bits_to_float(static_cast<uint32_t>(n1 + 127) << 23);
  const float scale2 = bits_to_float(static_cast<uint32_t>(n2 + 127) << 23);
  return p * scale1 * scale2;
}

// ---- work split -------------------------------------------------------------------------------------------

// Grain (elements per task) for at::parallel_for over memory-bound elementwise work: large enough that
// a task amortises its start-up, small enough that every thread gets work on mid-sized tensors.
constexpr int64_t kElementwiseGrain = 32768;

// Calls fn(offset, column, length) for each piece of the flat range [begin, end) of a row-major
// [rows, cols] tensor, split where rows end (so per-column operands such as `keep` stay contiguous).
template <typename F>
inline void for_each_row_piece(int64_t begin, int64_t end, int64_t cols, const F& fn) {
  while (begin < end) {
    const int64_t column = begin % cols;
    const int64_t length = std::min(end - begin, cols - column);
    fn(begin, column, length);
    begin += length;
  }
}

// ---- outputs ----------------------------------------------------------------------------------------------

// at::empty for an output a kernel is about to write whole. A large fresh tensor comes from mmap, and
// first-touch page faults (4 KiB at a time, each zero-filled by the kernel) can cost more than the
// kernel itself: filling 64 MiB that way takes ~20 ms here, dequantizing into it ~5 ms. So large
// outputs ask Linux for transparent huge pages (MADV_HUGEPAGE on their 2 MiB-aligned interior; honoured
// when THP is in "madvise" or "always" mode, a harmless hint otherwise), as torch's own
// THP_MEM_ALLOC_ENABLE does for every allocation.
inline at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor out = at::empty(shape, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  const uintptr_t start = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t bytes = out.nbytes();
  if (bytes >= 4 * kHugePage) {
    const uintptr_t first = (start + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t last = (start + bytes) & ~(kHugePage - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace fastrit::cpu
