// out = (a @ b) * scale, fused, for ig_accumulate_linear on the CPU.
//
// On CPUs with AVX-512 a packed-panel GEMM (the BLIS scheme: A and B copied into micro-panels, a 12 x 32
// register-tile micro-kernel over a 256-deep block) computes the product, reads b in its own dtype
// (bf16 / fp16 weights are widened while packing, never copied whole to float32) and multiplies by
// `scale` while the tile is still in registers/L1. Measured here it runs about twice as fast as
// at::mm's MKL sgemm, whose code path on this (AMD) CPU does not use AVX-512. Elsewhere: at::mm, then
// one multiply pass.

#include "cpu/gemm_cpu.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/avx512_utils.h"
#include "cpu/cpu_common.h"

namespace fastrit::cpu {
namespace {

void gemm_mul_aten(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, at::Tensor& out) {
  at::mm_out(out, a, b.scalar_type() == at::kFloat ? b : b.to(at::kFloat));
  out.mul_(scale);
}

#if FASTRIT_X86_64

constexpr int64_t kMR = 12;   // rows of the register tile (12 x 2 accumulators of 16 floats)
constexpr int64_t kNR = 32;   // columns of the register tile
constexpr int64_t kKC = 256;  // depth of a packed block: a B micro-panel (32 KiB) stays in L1
constexpr int64_t kMC = 144;  // rows of a task (its packed A block, 144 KiB, stays in L2)
constexpr int64_t kNC = 256;  // columns of a task

// The dtypes the kernel reads b and scale in (float64 goes through at::mm).
#define FASTRIT_GEMM_CASES(...)                     \
  AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)         \
  AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)      \
  AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)

bool avx512_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// b[0:kc, 0:nc] (row stride ldb) into ceil(nc / kNR) micro-panels, each [kc][kNR] float32, the columns
// past nc zero.
template <typename T>
FASTRIT_AVX512 void pack_b(const T* b, int64_t ldb, int64_t kc, int64_t nc, float* packed) {
  for (int64_t jp = 0; jp < nc; jp += kNR) {
    const int64_t width = std::min(kNR, nc - jp);
    float* dst = packed + (jp / kNR) * kc * kNR;
    const T* src = b + jp;
    if (width == kNR) {
      for (int64_t p = 0; p < kc; ++p) {
        _mm512_storeu_ps(dst + p * kNR, load16(src + p * ldb));
        _mm512_storeu_ps(dst + p * kNR + 16, load16(src + p * ldb + 16));
      }
    } else {
      for (int64_t p = 0; p < kc; ++p) {
        for (int64_t j = 0; j < kNR; ++j) dst[p * kNR + j] = j < width ? load_f32(src[p * ldb + j]) : 0.0f;
      }
    }
  }
}

// a[0:mc, 0:kc] (float32, row stride lda) into ceil(mc / kMR) micro-panels, each [kc][kMR], the rows
// past mc zero.
FASTRIT_AVX512 void pack_a(const float* a, int64_t lda, int64_t mc, int64_t kc, float* packed) {
  for (int64_t ip = 0; ip < mc; ip += kMR) {
    const int64_t height = std::min(kMR, mc - ip);
    float* dst = packed + (ip / kMR) * kc * kMR;
    const float* src = a + ip * lda;
    for (int64_t p = 0; p < kc; ++p) {
      for (int64_t r = 0; r < kMR; ++r) dst[p * kMR + r] = r < height ? src[r * lda + p] : 0.0f;
    }
  }
}

// tile[kMR][kNR] = A micro-panel @ B micro-panel over depth kc: 24 accumulators in registers, one
// broadcast of A and two loads of B per 24 FMAs.
FASTRIT_AVX512 void micro_kernel(int64_t kc, const float* __restrict a, const float* __restrict b,
                                 float* __restrict tile) {
  __m512 acc[kMR][2];
#pragma GCC unroll 12
  for (int r = 0; r < kMR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kc; ++p) {
    const __m512 b0 = _mm512_loadu_ps(b);
    const __m512 b1 = _mm512_loadu_ps(b + 16);
#pragma GCC unroll 12
    for (int r = 0; r < kMR; ++r) {
      const __m512 av = _mm512_set1_ps(a[r]);
      acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
    }
    a += kMR;
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

// The task out[i0:i1, j0:j1]: for each depth block, pack its A rows and B columns, then every register
// tile (B micro-panel outer so it stays in L1 while the A micro-panels stream from L2).
template <typename TB, typename TS>
FASTRIT_AVX512 void gemm_mul_task(const float* a, const TB* b, const TS* scale, float* out, int64_t n, int64_t k,
                                  int64_t i0, int64_t i1, int64_t j0, int64_t j1, float* a_packed, float* b_packed,
                                  float* tile) {
  const int64_t mc = i1 - i0;
  const int64_t nc = j1 - j0;
  for (int64_t pc = 0; pc < k; pc += kKC) {
    const int64_t kc = std::min(kKC, k - pc);
    pack_b(b + pc * n + j0, n, kc, nc, b_packed);
    pack_a(a + i0 * k + pc, k, mc, kc, a_packed);
    const bool accumulate = pc > 0;
    const bool last = pc + kc == k;
    for (int64_t jp = 0; jp < nc; jp += kNR) {
      const int64_t cols = std::min(kNR, nc - jp);
      for (int64_t ip = 0; ip < mc; ip += kMR) {
        const int64_t rows = std::min(kMR, mc - ip);
        micro_kernel(kc, a_packed + (ip / kMR) * kc * kMR, b_packed + (jp / kNR) * kc * kNR, tile);
        const int64_t offset = (i0 + ip) * n + j0 + jp;
        store_tile(tile, rows, cols, accumulate, last ? scale + offset : static_cast<const TS*>(nullptr),
                   out + offset, n);
      }
    }
  }
}

void gemm_mul_avx512(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, at::Tensor& out) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  const int64_t row_tasks = (m + kMC - 1) / kMC;
  const int64_t col_tasks = (n + kNC - 1) / kNC;
  // Small products are not worth waking the other threads for.
  const int64_t grain = m * n * k < (int64_t{1} << 20) ? row_tasks * col_tasks : 1;
  AT_DISPATCH_SWITCH(b.scalar_type(), "gemm_mul_cpu", FASTRIT_GEMM_CASES([&] {
    using TB = scalar_t;
    AT_DISPATCH_SWITCH(scale.scalar_type(), "gemm_mul_cpu", FASTRIT_GEMM_CASES([&] {
      using TS = scalar_t;
      const float* a_p = a.const_data_ptr<float>();
      const TB* b_p = b.const_data_ptr<TB>();
      const TS* scale_p = scale.const_data_ptr<TS>();
      float* out_p = out.mutable_data_ptr<float>();
      at::parallel_for(0, row_tasks * col_tasks, grain, [&](int64_t begin, int64_t end) {
        // Per-thread packing buffers (sized for a full task).
        std::vector<float> a_packed(kMC * kKC), b_packed(kNC * kKC), tile(kMR * kNR);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t i0 = (task / col_tasks) * kMC, j0 = (task % col_tasks) * kNC;
          gemm_mul_task(a_p, b_p, scale_p, out_p, n, k, i0, std::min(i0 + kMC, m), j0, std::min(j0 + kNC, n),
                        a_packed.data(), b_packed.data(), tile.data());
        }
      });
    }));
  }));
}

#endif  // FASTRIT_X86_64

}  // namespace

bool gemm_mul_has_avx512() {
  const char* choice = std::getenv("FASTRIT_CPU_GEMM");
  return cpu_has_avx512() && !(choice != nullptr && std::strcmp(choice, "aten") == 0);
}

void gemm_mul(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, at::Tensor& out) {
  TORCH_CHECK(a.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat, "gemm_mul: a and out must be float32");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "gemm_mul: shapes ", a.sizes(), " @ ",
              b.sizes());
  TORCH_CHECK(scale.sizes() == out.sizes() && out.size(0) == a.size(0) && out.size(1) == b.size(1),
              "gemm_mul: scale ", scale.sizes(), " / out ", out.sizes());
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && scale.is_contiguous() && out.is_contiguous(),
              "gemm_mul: contiguous tensors expected");
#if FASTRIT_X86_64
  // An empty depth (k == 0) is a zero product: at::mm handles it (and the empty shapes).
  if (gemm_mul_has_avx512() && a.numel() > 0 && out.numel() > 0 && avx512_dtype(b.scalar_type()) &&
      avx512_dtype(scale.scalar_type())) {
    gemm_mul_avx512(a, b, scale, out);
    return;
  }
#endif
  gemm_mul_aten(a, b, scale, out);
}

}  // namespace fastrit::cpu
