// out = (a @ b) * scale on the CPU, fused: the GEMM behind ig_accumulate_linear.
#pragma once

#include <ATen/ATen.h>

namespace fastrit::cpu {

// Whether gemm_mul runs its AVX-512 kernel on this machine. False on CPUs without AVX-512F, off x86-64,
// or when the environment variable FASTRIT_CPU_GEMM=aten asks for the portable path (at::mm then a
// multiply), e.g. to test it.
bool gemm_mul_has_avx512();

// out[M, N] = (a[M, K] @ b[K, N]) * scale[M, N], float32 arithmetic with float32 accumulation.
// a: float32; b and scale: float32, bfloat16, float16 or float64 (read as float32); out: float32. All
// contiguous, on the CPU. The product is multiplied into scale element by element, as
// `scale.float() * (a @ b.float())` does.
void gemm_mul(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, at::Tensor& out);

}  // namespace fastrit::cpu
