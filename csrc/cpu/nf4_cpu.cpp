// bitsandbytes' blockwise NF4 on the CPU, bit-exact with reference.nf4_quantize_blocks /
// nf4_dequantize_blocks (and with bitsandbytes.functional.quantize_4bit's packed bytes and absmax).
//
// Quantize: absmax per block of `blocksize` consecutive elements; a full block is scaled by
// (1 / max(absmax, 1e-38)), the final partial block divided by its absmax clamped to >= 1e-38 (which is
// also what is stored for it); the code is the number of bucket boundaries (midpoints of consecutive
// code values) below the scaled value; two codes per byte, even element in the high nibble, an odd
// element count padded with one zero. Dequantize: code[q] * absmax[block] in float32, then cast.

#include <torch/library.h>

#include <array>
#include <type_traits>

#include "checks.h"
#include "cpu/avx512_utils.h"
#include "cpu/cpu_common.h"
#include "nf4_code.h"

namespace fastrit::cpu {
namespace {

constexpr std::array<float, 15> kMidpoints = [] {
  std::array<float, 15> mids{};
  for (int i = 0; i < 15; ++i) mids[i] = nf4_midpoint(i);
  return mids;
}();

// torch.bucketize(v, midpoints, right=False): the boundaries not >= v. A NaN counts every boundary
// (code 15), as torch's binary search does. The reference clamps v to [-1, 1] first; that cannot
// change the count (every boundary lies inside (-1, 1)), so it is left out.
FASTRIT_ALWAYS_INLINE uint8_t nf4_bucket(float v) {
  int q = 0;
  for (int i = 0; i < 15; ++i) q += !(kMidpoints[i] >= v);
  return static_cast<uint8_t>(q);
}

// max |x| over a block; NaN if it holds a NaN (torch's amax propagates NaN). On the bits: for
// non-negative floats the unsigned integer order is the float order, and every NaN lies above inf.
template <typename T>
FASTRIT_CPU_CLONES float block_absmax(const T* __restrict x, int64_t length) {
  uint32_t max_bits = 0;
  for (int64_t j = 0; j < length; ++j) {
    const uint32_t bits = float_to_bits(load_f32(x[j])) & 0x7FFFFFFFu;
    max_bits = bits > max_bits ? bits : max_bits;
  }
  return bits_to_float(max_bits);
}

// codes[j] for x[j] * inverse (a full block).
template <typename T>
FASTRIT_CPU_CLONES void quantize_scaled(const T* __restrict x, float inverse, uint8_t* __restrict codes,
                                        int64_t length) {
  for (int64_t j = 0; j < length; ++j) codes[j] = nf4_bucket(load_f32(x[j]) * inverse);
}

// codes[j] for x[j] / divisor (the final partial block).
template <typename T>
FASTRIT_CPU_CLONES void quantize_divided(const T* __restrict x, float divisor, uint8_t* __restrict codes,
                                         int64_t length) {
  for (int64_t j = 0; j < length; ++j) codes[j] = nf4_bucket(load_f32(x[j]) / divisor);
}

FASTRIT_CPU_CLONES void pack_nibbles(const uint8_t* __restrict codes, uint8_t* __restrict packed, int64_t bytes) {
  for (int64_t i = 0; i < bytes; ++i) packed[i] = static_cast<uint8_t>((codes[2 * i] << 4) | codes[2 * i + 1]);
}

// out[j] = code[q(first + j)] * scale for elements of one block.
template <typename T>
FASTRIT_CPU_CLONES void dequantize_piece(const uint8_t* __restrict packed, int64_t first, float scale,
                                         T* __restrict out, int64_t length) {
  for (int64_t j = 0; j < length; ++j) {
    const int64_t e = first + j;
    const uint8_t byte = packed[e >> 1];
    const int q = (e & 1) ? (byte & 0xF) : (byte >> 4);
    out[j] = store_f32<T>(kNF4Code[q] * scale);
  }
}

#if FASTRIT_X86_64
// As dequantize_piece, 32 elements (16 bytes) per step: the nibbles are split and interleaved back into
// element order, widened to 16 x int32 and looked up in the code table held in one register.
template <typename T>
FASTRIT_AVX512 void dequantize_piece_avx512(const uint8_t* __restrict packed, int64_t first, float scale,
                                            T* __restrict out, int64_t length) {
  int64_t j = 0;
  if (first & 1) {  // a block starting mid-byte (odd blocksize): its first element alone
    out[0] = store_f32<T>(kNF4Code[packed[first >> 1] & 0xF] * scale);
    j = 1;
  }
  const __m512 table = _mm512_loadu_ps(kNF4Code);
  const __m512 factor = _mm512_set1_ps(scale);
  const __m128i low_nibble = _mm_set1_epi8(0x0F);
  for (; j + 32 <= length; j += 32) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + ((first + j) >> 1)));
    const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_nibble);  // even elements
    const __m128i low = _mm_and_si128(bytes, low_nibble);                      // odd elements
    const __m512i codes0 = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(high, low));
    const __m512i codes1 = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(high, low));
    store16(out + j, _mm512_mul_ps(_mm512_permutexvar_ps(codes0, table), factor));
    store16(out + j + 16, _mm512_mul_ps(_mm512_permutexvar_ps(codes1, table), factor));
  }
  for (; j < length; ++j) {
    const int64_t e = first + j;
    const uint8_t byte = packed[e >> 1];
    out[j] = store_f32<T>(kNF4Code[(e & 1) ? (byte & 0xF) : (byte >> 4)] * scale);
  }
}
#endif

// Elements quantized per step of the byte loop (even, so pieces start on a byte).
constexpr int64_t kNF4Piece = 4096;

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cpu(const at::Tensor& weight_in, int64_t blocksize) {
  check_nf4_quantize(weight_in, blocksize);
  const at::Tensor weight = weight_in.contiguous();
  const int64_t numel = weight.numel();
  const int64_t blocks = (numel + blocksize - 1) / blocksize;
  const int64_t full_blocks = numel / blocksize;
  at::Tensor packed = empty_output({(numel + 1) / 2, 1}, weight.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, weight.options().dtype(at::kFloat));
  if (numel == 0) return {packed, absmax};
  float* absmax_p = absmax.mutable_data_ptr<float>();
  uint8_t* packed_p = packed.mutable_data_ptr<uint8_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "nf4_quantize_cpu", [&] {
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, std::max<int64_t>(1, kElementwiseGrain / blocksize), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t start = b * blocksize;
        const float m = block_absmax(w + start, std::min(blocksize, numel - start));
        // The partial block stores its clamped absmax, full blocks their own.
        absmax_p[b] = b < full_blocks ? m : (m < kNF4MinAbsmax ? kNF4MinAbsmax : m);
      }
    });

    // Pieces of whole bytes; inside a piece, one call per block segment.
    const int64_t padded = numel + (numel & 1);
    at::parallel_for(0, (padded + kNF4Piece - 1) / kNF4Piece, 1, [&](int64_t begin, int64_t end) {
      std::array<uint8_t, kNF4Piece> codes;
      for (int64_t piece = begin; piece < end; ++piece) {
        const int64_t e0 = piece * kNF4Piece;
        const int64_t e1 = std::min(e0 + kNF4Piece, numel);
        for (int64_t e = e0; e < e1;) {
          const int64_t b = e / blocksize;
          const int64_t stop = std::min(e1, (b + 1) * blocksize);
          if (b < full_blocks) {
            // As the reference: the reciprocal of the clamped absmax (NaN stays NaN), then a multiply.
            const float m = absmax_p[b];
            quantize_scaled(w + e, 1.0f / (m < kNF4MinAbsmax ? kNF4MinAbsmax : m), codes.data() + (e - e0), stop - e);
          } else {
            quantize_divided(w + e, absmax_p[b], codes.data() + (e - e0), stop - e);
          }
          e = stop;
        }
        const int64_t stop = std::min(e0 + kNF4Piece, padded);
        if (stop > numel) codes[numel - e0] = nf4_bucket(0.0f);  // the padding element of an odd count
        pack_nibbles(codes.data(), packed_p + e0 / 2, (stop - e0) / 2);
      }
    });
  });
  return {packed, absmax};
}

at::Tensor nf4_dequantize_cpu(const at::Tensor& packed_in, const at::Tensor& absmax_in, int64_t blocksize,
                              at::IntArrayRef shape, at::ScalarType dtype) {
  const int64_t numel = check_nf4_dequantize(packed_in, absmax_in, blocksize, shape, dtype);
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor absmax = absmax_in.contiguous();
  at::Tensor out = empty_output(shape, packed.options().dtype(dtype));
  if (numel == 0) return out;
  const uint8_t* packed_p = packed.const_data_ptr<uint8_t>();
  const float* absmax_p = absmax.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "nf4_dequantize_cpu", [&] {
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    bool use_avx512 = false;
#if FASTRIT_X86_64
    use_avx512 = cpu_has_avx512() && !std::is_same_v<scalar_t, double>;
#endif
    at::parallel_for(0, numel, kElementwiseGrain, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end;) {
        const int64_t b = e / blocksize;
        const int64_t stop = std::min(end, (b + 1) * blocksize);
#if FASTRIT_X86_64
        if constexpr (!std::is_same_v<scalar_t, double>) {
          if (use_avx512) {
            dequantize_piece_avx512(packed_p, e, absmax_p[b], out_p + e, stop - e);
            e = stop;
            continue;
          }
        }
#endif
        dequantize_piece(packed_p, e, absmax_p[b], out_p + e, stop - e);
        e = stop;
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace fastrit::cpu

TORCH_LIBRARY_IMPL(fastrit, CPU, m) {
  m.impl("nf4_quantize", &fastrit::cpu::nf4_quantize_cpu);
  m.impl("nf4_dequantize", &fastrit::cpu::nf4_dequantize_cpu);
}
