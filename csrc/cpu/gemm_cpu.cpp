// out = ((sum_s w_s a[s]) @ b) * scale with AVX-512, for ig_accumulate_linear on the CPU.
//
// A packed-panel GEMM in the BLIS scheme. b is packed once per (column block, depth block) into
// micro-panels [depth][32] shared by all threads (read in its own dtype: bf16 / fp16 weights are widened
// while packing, never copied whole to float32). Each thread takes an equal share of the rows, a group
// of two 12-row register tiles at a time: the group's left operand, the weighted sum of the S slices of
// a, is formed into a small buffer (rows at a fixed stride, so the micro-kernel addresses all 12 rows of
// a tile from one pointer); then every B micro-panel, loaded into L1 once per group, meets both tiles in
// a 12 x 32 register tile (24 accumulators) over the 256-deep block, which is multiplied by `scale` on
// its way out. Meanwhile the micro-kernels prefetch the rows of a that the next group will sum, so the
// memory traffic of the weighted sum (a is the largest input) overlaps the arithmetic instead of
// stalling it. On the 2-core test machine (AMD Zen 5) the GEMM alone (one slice, 512 x 256 @ 256 x 704)
// reaches 200-230 GFLOP/s on one thread, 85-95 % of a measured FMA peak of 236, and runs 2.2x as fast
// as at::mm's MKL sgemm, whose code path on this CPU does not use AVX-512.

#include "cpu/gemm_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/avx512_utils.h"
#include "cpu/cpu_common.h"
#include "cpu/weighted_sum.h"

namespace fastrit::cpu {
namespace {

bool avx512_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

#if FASTRIT_X86_64

constexpr int64_t kMR = 12;                // rows of the register tile (12 x 2 accumulators of 16 floats)
constexpr int64_t kNR = 32;                // columns of the register tile
constexpr int64_t kKC = 256;               // depth of a block: a B micro-panel (32 KiB) stays in L1
constexpr int64_t kNC = 768;               // columns of a packed B block (768 KiB, shared by the threads)
// Register tiles summed and run together, so each B micro-panel brought into L1 serves two tiles. (On
// the 2-core test machine groups of 1, 2 and 4 tiles measured within noise of each other.)
constexpr int64_t kGroupTiles = 2;

// The dtypes the kernel reads a, b and scale in.
#define FASTRIT_GEMM_CASES(...)             \
  AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
  AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
  AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)

// Float32 work buffers owned by the calling thread, grown on demand and kept (a fresh allocation of the
// packed B block per call would come from mmap and pay its page faults every time). One set per thread,
// shared by every dtype combination of the kernel.
enum class Buffer { kPackedB, kSummedA, kTile };

float* thread_buffer(Buffer which, int64_t size) {
  thread_local std::vector<float> buffers[3];
  std::vector<float>& buffer = buffers[static_cast<int>(which)];
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

// One B micro-panel: b[0:kc, 0:width] (row stride ldb) into dst[kc][kNR] float32, columns past width zero.
template <typename T>
FASTRIT_AVX512 void pack_b_panel(const T* b, int64_t ldb, int64_t kc, int64_t width, float* dst) {
  if (width == kNR) {
    for (int64_t p = 0; p < kc; ++p) {
      _mm512_storeu_ps(dst + p * kNR, load16(b + p * ldb));
      _mm512_storeu_ps(dst + p * kNR + 16, load16(b + p * ldb + 16));
    }
    return;
  }
  for (int64_t p = 0; p < kc; ++p) {
    for (int64_t j = 0; j < kNR; ++j) dst[p * kNR + j] = j < width ? load_f32(b[p * ldb + j]) : 0.0f;
  }
}

// dst[r * kKC + p] = sum_s w[s] * a[s * step_stride + r * lda + p] for r < rows, p < kc; the rows from
// `rows` up to `padded_rows` are zero (the register tile's rows past the end of the matrix). dst (a group
// of tiles, at most 24 KiB) stays in L1 while each slice of a in turn adds its rows to it, so a is read as
// S sequential streams rather than S short interleaved ones.
template <typename T>
FASTRIT_AVX512 void sum_group_rows(const T* a, int64_t step_stride, int64_t lda, const float* w, int64_t steps,
                                int64_t rows, int64_t padded_rows, int64_t kc, float* dst) {
  for (int64_t s = 0; s < steps; ++s) {
    const float weight = w[s];
    const __m512 ws = _mm512_set1_ps(weight);
    for (int64_t r = 0; r < rows; ++r) {
      const T* src = a + s * step_stride + r * lda;
      float* d = dst + r * kKC;
      int64_t p = 0;
      if (s == 0) {
        for (; p + 16 <= kc; p += 16) _mm512_storeu_ps(d + p, _mm512_mul_ps(ws, load16(src + p)));
        for (; p < kc; ++p) d[p] = weight * load_f32(src[p]);
      } else {
        for (; p + 16 <= kc; p += 16) {
          _mm512_storeu_ps(d + p, _mm512_fmadd_ps(ws, load16(src + p), _mm512_loadu_ps(d + p)));
        }
        for (; p < kc; ++p) d[p] = std::fma(weight, load_f32(src[p]), d[p]);
      }
    }
  }
  for (int64_t r = rows; r < padded_rows; ++r) std::fill(dst + r * kKC, dst + r * kKC + kc, 0.0f);
}

// The rows of a, in every slice, that the next register tile will sum, handed out one cache line at a
// time to the micro-kernels of the current tile. They prefetch them between their FMAs, so the memory
// traffic of the weighted sum overlaps the arithmetic of the GEMM instead of stalling it.
struct PrefetchRows {
  const char* row_ptr = nullptr;    // start of the current row
  const char* slice_ptr = nullptr;  // start of the current slice's first row
  int64_t slice_stride = 0, row_stride = 0;  // bytes
  int64_t rows = 0, lines_per_row = 0;
  int64_t row = 0, line = 0;  // position within the current slice
  int64_t lines_left = 0;

  PrefetchRows() = default;
  PrefetchRows(const void* first, int64_t slice_stride_bytes, int64_t row_stride_bytes, int64_t row_count,
               int64_t slice_count, int64_t row_bytes)
      : row_ptr(static_cast<const char*>(first)),
        slice_ptr(row_ptr),
        slice_stride(slice_stride_bytes),
        row_stride(row_stride_bytes),
        rows(row_count),
        lines_per_row((row_bytes + 63) / 64),
        lines_left(row_count * slice_count * lines_per_row) {}

  // The next line to prefetch (call only while lines_left > 0).
  FASTRIT_ALWAYS_INLINE const char* next() {
    const char* line_ptr = row_ptr + line * 64;
    --lines_left;
    if (++line == lines_per_row) {
      line = 0;
      if (++row == rows) {
        row = 0;
        slice_ptr += slice_stride;
        row_ptr = slice_ptr;
      } else {
        row_ptr += row_stride;
      }
    }
    return line_ptr;
  }
};

// tile[kMR][kNR] = A rows (kMR of them, kKC apart) @ B micro-panel [kc][kNR]: 24 accumulators in
// registers; per depth step two loads of B and kMR broadcasts of A feed 24 FMAs. Issues up to
// `prefetches` of `pf`'s lines along the way (one per depth step).
FASTRIT_AVX512 void micro_kernel(int64_t kc, const float* __restrict a, const float* __restrict b,
                                 float* __restrict tile, PrefetchRows& pf, int64_t prefetches) {
  __m512 acc[kMR][2];
#pragma GCC unroll 12
  for (int r = 0; r < kMR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  prefetches = std::min({prefetches, pf.lines_left, kc});
  for (int64_t p = 0; p < kc; ++p) {
    if (p < prefetches) _mm_prefetch(pf.next(), _MM_HINT_T0);
    const __m512 b0 = _mm512_loadu_ps(b);
    const __m512 b1 = _mm512_loadu_ps(b + 16);
#pragma GCC unroll 12
    for (int r = 0; r < kMR; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * kKC]);
      acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
    }
    a += 1;
    b += kNR;
  }
#pragma GCC unroll 12
  for (int r = 0; r < kMR; ++r) {
    _mm512_storeu_ps(tile + r * kNR, acc[r][0]);
    _mm512_storeu_ps(tile + r * kNR + 16, acc[r][1]);
  }
}

// out[0:rows, 0:cols] (row stride ld) = tile (+ out when `accumulate`: a later depth block), then
// * scale when `scale` is given (the last depth block). scale has row stride ld too.
template <typename S>
FASTRIT_AVX512 void store_tile(const float* tile, int64_t rows, int64_t cols, bool accumulate, const S* scale,
                               float* out, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out + r * ld;
    const float* t = tile + r * kNR;
    if (cols == kNR) {
      for (int64_t h = 0; h < kNR; h += 16) {
        __m512 v = _mm512_loadu_ps(t + h);
        if (accumulate) v = _mm512_add_ps(v, _mm512_loadu_ps(o + h));
        if (scale != nullptr) v = _mm512_mul_ps(v, load16(scale + r * ld + h));
        _mm512_storeu_ps(o + h, v);
      }
    } else {
      for (int64_t j = 0; j < cols; ++j) {
        float v = t[j];
        if (accumulate) v += o[j];
        if (scale != nullptr) v *= load_f32(scale[r * ld + j]);
        o[j] = v;
      }
    }
  }
}

template <typename TA, typename TB, typename TS>
void weighted_gemm_mul_typed(const TA* a, int64_t steps, const float* w, const TB* b, const TS* scale, float* out,
                             int64_t m, int64_t k, int64_t n) {
  const int64_t tiles = (m + kMR - 1) / kMR;
  // Small products are not worth waking the other threads for.
  const bool serial = m * n * k < (int64_t{1} << 20);
  float* b_packed = thread_buffer(Buffer::kPackedB, std::min(n + kNR - 1, kNC) / kNR * kNR * kKC);
  for (int64_t jc = 0; jc < n; jc += kNC) {
    const int64_t nc = std::min(kNC, n - jc);
    const int64_t panels = (nc + kNR - 1) / kNR;
    for (int64_t pc = 0; pc < k; pc += kKC) {
      const int64_t kc = std::min(kKC, k - pc);
      at::parallel_for(0, panels, serial ? panels : 1, [&](int64_t begin, int64_t end) {
        for (int64_t jp = begin; jp < end; ++jp) {
          pack_b_panel(b + pc * n + jc + jp * kNR, n, kc, std::min(kNR, nc - jp * kNR), b_packed + jp * kc * kNR);
        }
      });
      const bool accumulate = pc > 0;
      const bool last = pc + kc == k;
      // Each thread gets one contiguous run of tiles, the runs differing by at most one tile.
      at::parallel_for(0, tiles, serial ? tiles : 1, [&](int64_t begin, int64_t end) {
        float* a_group = thread_buffer(Buffer::kSummedA, kGroupTiles * kMR * kKC);
        float* tile = thread_buffer(Buffer::kTile, kMR * kNR);
        const int64_t row_begin = begin * kMR;
        const int64_t row_end = std::min(m, end * kMR);
        constexpr int64_t kGroupRows = kGroupTiles * kMR;
        // This thread's rows, a group of register tiles at a time: sum the group's rows of every slice of a
        // (prefetched while the previous group ran), then run every B micro-panel against its tiles.
        PrefetchRows pf;
        for (int64_t row0 = row_begin; row0 < row_end; row0 += kGroupRows) {
          const int64_t rows = std::min(kGroupRows, row_end - row0);
          const int64_t padded_rows = (rows + kMR - 1) / kMR * kMR;
          sum_group_rows(a + row0 * k + pc, m * k, k, w, steps, rows, padded_rows, kc, a_group);
          const int64_t next_rows = std::min(kGroupRows, row_end - row0 - rows);
          pf = PrefetchRows(a + (row0 + rows) * k + pc, m * k * sizeof(TA), k * sizeof(TA), next_rows, steps,
                            kc * sizeof(TA));
          const int64_t kernels = panels * (padded_rows / kMR);
          const int64_t per_kernel = (pf.lines_left + kernels - 1) / kernels;
          for (int64_t jp = 0; jp < panels; ++jp) {
            for (int64_t ip = 0; ip < rows; ip += kMR) {
              micro_kernel(kc, a_group + ip * kKC, b_packed + jp * kc * kNR, tile, pf, per_kernel);
              const int64_t offset = (row0 + ip) * n + jc + jp * kNR;
              store_tile(tile, std::min(kMR, rows - ip), std::min(kNR, nc - jp * kNR), accumulate,
                         last ? scale + offset : static_cast<const TS*>(nullptr), out + offset, n);
            }
          }
        }
      });
    }
  }
}

#endif  // FASTRIT_X86_64

}  // namespace

bool weighted_gemm_mul_supported(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale) {
  const char* choice = std::getenv("FASTRIT_CPU_GEMM");
  if (choice != nullptr && std::strcmp(choice, "aten") == 0) return false;
  return cpu_has_avx512() && a.numel() > 0 && b.numel() > 0 && scale.numel() > 0 && avx512_dtype(a.scalar_type()) &&
         avx512_dtype(b.scalar_type()) && avx512_dtype(scale.scalar_type());
}

void weighted_gemm_mul(const at::Tensor& a, const at::Tensor& weights, const at::Tensor& b, const at::Tensor& scale,
                       at::Tensor& out) {
  TORCH_CHECK(weighted_gemm_mul_supported(a, b, scale), "weighted_gemm_mul: not supported for these operands here");
  TORCH_CHECK(a.dim() == 3 && b.dim() == 2 && a.size(2) == b.size(0), "weighted_gemm_mul: shapes ", a.sizes(), " @ ",
              b.sizes());
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.dim() == 1 && weights.size(0) == a.size(0),
              "weighted_gemm_mul: weights ", weights.sizes(), " for ", a.size(0), " slices");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.size(0) == a.size(1) &&
                  out.size(1) == b.size(1) && scale.sizes() == out.sizes(),
              "weighted_gemm_mul: scale ", scale.sizes(), " / out ", out.sizes());
  TORCH_CHECK(a.is_contiguous() && weights.is_contiguous() && b.is_contiguous() && scale.is_contiguous() &&
                  out.is_contiguous(),
              "weighted_gemm_mul: contiguous tensors expected");
#if FASTRIT_X86_64
  const int64_t steps = a.size(0), m = a.size(1), k = a.size(2), n = b.size(1);
  at::Tensor summand = a;
  at::Tensor summand_weights = weights;
  if (steps > 1 && n > kNC) {
    // Every column block would redo the weighted sum: form it once, then run the GEMM on it.
    summand = at::empty({1, m, k}, a.options().dtype(at::kFloat));
    summand_weights = at::ones({1}, weights.options());
    weighted_sum(a, weights, summand);
  }
  AT_DISPATCH_SWITCH(summand.scalar_type(), "weighted_gemm_mul_cpu", FASTRIT_GEMM_CASES([&] {
    using TA = scalar_t;
    AT_DISPATCH_SWITCH(b.scalar_type(), "weighted_gemm_mul_cpu", FASTRIT_GEMM_CASES([&] {
      using TB = scalar_t;
      AT_DISPATCH_SWITCH(scale.scalar_type(), "weighted_gemm_mul_cpu", FASTRIT_GEMM_CASES([&] {
        weighted_gemm_mul_typed(summand.const_data_ptr<TA>(), summand.size(0), summand_weights.const_data_ptr<float>(),
                                b.const_data_ptr<TB>(), scale.const_data_ptr<scalar_t>(),
                                out.mutable_data_ptr<float>(), m, k, n);
      }));
    }));
  }));
#endif
}

}  // namespace fastrit::cpu
