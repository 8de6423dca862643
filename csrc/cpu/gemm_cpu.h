// out = ((sum_s w_s a[s]) @ b) * scale on the CPU, fused: the kernel behind ig_accumulate_linear.
#pragma once

#include <ATen/ATen.h>

namespace fastrit::cpu {

// Whether weighted_gemm_mul runs these operands on this machine: an AVX-512 CPU, float32 / bfloat16 /
// float16 operands, nothing empty, and the environment variable FASTRIT_CPU_GEMM not set to "aten"
// (which asks for the portable path, e.g. to test it). Otherwise the caller uses ATen.
bool weighted_gemm_mul_supported(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale);

// out[M, N] = ((sum_s weights[s] * a[s]) @ b) * scale, float32 arithmetic with float32 accumulation.
// a: [S, M, K]; b: [K, N]; scale: [M, N] — each float32, bfloat16 or float16, widened to float32 as it is
// read (never copied whole). weights: [S] float32. out: [M, N] float32. All contiguous, on the CPU. The
// weighted sum is formed block by block as the GEMM packs its left operand, so [M, K] is never written
// out (unless several column blocks would each redo it); the multiply by `scale` happens while a tile of
// the product is still in L1. Call only when weighted_gemm_mul_supported().
void weighted_gemm_mul(const at::Tensor& a, const at::Tensor& weights, const at::Tensor& b, const at::Tensor& scale,
                       at::Tensor& out);

}  // namespace fastrit::cpu
