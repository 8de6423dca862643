// The weighted sum over IG steps on the CPU, shared by ig_accumulate_linear's two paths.
#pragma once

#include <ATen/ATen.h>

namespace fastrit::cpu {

// out[j] = sum_k weights[k] * grads[k, j] over the flat slices of grads [m, ...] (contiguous, float32 /
// bfloat16 / float16 / float64), float32 arithmetic. weights: [m] float32; out: float32, contiguous, with
// as many elements as one slice. Defined in ig_cpu.cpp beside the piece kernel ig_accumulate also uses.
void weighted_sum(const at::Tensor& grads, const at::Tensor& weights, at::Tensor& out);

}  // namespace fastrit::cpu
