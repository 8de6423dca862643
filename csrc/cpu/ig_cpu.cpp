// Integrated Gradients kernels on the CPU: interpolation points, and the accumulation of the gradients
// at those points into neuron scores (directly, or through the linear output projection).

#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_common.h"
#include "cpu/gemm_cpu.h"
#include "cpu/weighted_sum.h"

namespace fastrit::cpu {
namespace {

// Elements of [N, D] handled together: small enough that the piece of every operand stays in L1 while
// all m steps go over it.
constexpr int64_t kPiece = 4096;

// Grain of a parallel loop over [N, D] whose every element touches `steps` steps.
int64_t grain_for(int64_t steps) { return std::max<int64_t>(kPiece, kElementwiseGrain / std::max<int64_t>(steps, 1)); }

// out[k, j] = base[j] + alphas[k] * direction[j] for the m steps, over one piece of the flat [N, D].
// Multiply and add rounded separately (no FMA), as the reference does: the result is bit-exact.
template <typename T>
FASTRIT_CPU_CLONES void interpolate_piece(const T* __restrict base, const T* __restrict direction,
                                          const float* __restrict alphas, int64_t steps, int64_t step_stride,
                                          T* __restrict out, int64_t length) {
  for (int64_t k = 0; k < steps; ++k) {
    const float alpha = alphas[k];
    T* o = out + k * step_stride;
    for (int64_t j = 0; j < length; ++j) o[j] = store_f32<T>(load_f32(base[j]) + alpha * load_f32(direction[j]));
  }
}

// acc[j] = sum_k weights[k] * grads[k, j] over one piece (grads[k] starts step_stride after grads[k-1]).
template <typename G>
FASTRIT_CPU_CLONES void weighted_sum_piece(const G* __restrict grads, int64_t step_stride,
                                           const float* __restrict weights, int64_t steps, float* __restrict acc,
                                           int64_t length) {
  for (int64_t j = 0; j < length; ++j) acc[j] = 0.0f;
  for (int64_t k = 0; k < steps; ++k) {
    const float w = weights[k];
    const G* g = grads + k * step_stride;
    for (int64_t j = 0; j < length; ++j) acc[j] += w * load_f32(g[j]);
  }
}

// acc[j] = act[j] * acc[j] (the reference's act.float() * sum).
template <typename A>
FASTRIT_CPU_CLONES void scale_piece(const A* __restrict act, float* __restrict acc, int64_t length) {
  for (int64_t j = 0; j < length; ++j) acc[j] = load_f32(act[j]) * acc[j];
}

}  // namespace

void weighted_sum(const at::Tensor& grads, const at::Tensor& weights, at::Tensor& out) {
  const int64_t numel = out.numel();
  const int64_t steps = weights.numel();
  if (numel == 0) return;
  const float* w = weights.const_data_ptr<float>();
  float* out_p = out.mutable_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grads.scalar_type(), "ig_weighted_sum_cpu", [&] {
    const scalar_t* g = grads.const_data_ptr<scalar_t>();
    at::parallel_for(0, numel, grain_for(steps), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; p += kPiece) {
        weighted_sum_piece(g + p, numel, w, steps, out_p + p, std::min(kPiece, end - p));
      }
    });
  });
}

namespace {

at::Tensor ig_interpolate_cpu(const at::Tensor& base_in, const at::Tensor& direction_in, const at::Tensor& alphas_in) {
  check_ig_interpolate(base_in, direction_in, alphas_in);
  const at::Tensor base = base_in.contiguous();
  const at::Tensor direction = direction_in.contiguous();
  const at::Tensor alphas = alphas_in.contiguous();
  const int64_t steps = alphas.size(0);
  at::Tensor out = empty_output({steps, base.size(0), base.size(1)}, base.options());
  const int64_t numel = base.numel();
  if (numel == 0 || steps == 0) return out;
  const float* alphas_p = alphas.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, base.scalar_type(), "ig_interpolate_cpu", [&] {
    const scalar_t* base_p = base.const_data_ptr<scalar_t>();
    const scalar_t* dir_p = direction.const_data_ptr<scalar_t>();
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, numel, grain_for(steps), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; p += kPiece) {
        interpolate_piece(base_p + p, dir_p + p, alphas_p, steps, numel, out_p + p, std::min(kPiece, end - p));
      }
    });
  });
  return out;
}

at::Tensor ig_accumulate_cpu(const at::Tensor& act_in, const at::Tensor& grads_in, const at::Tensor& weights_in) {
  check_ig_accumulate(act_in, grads_in, weights_in);
  const at::Tensor act = act_in.contiguous();
  const at::Tensor grads = grads_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  at::Tensor out = empty_output(act.sizes(), act.options().dtype(at::kFloat));
  const int64_t numel = act.numel();
  if (numel == 0) return out;
  const int64_t steps = weights.numel();
  const float* w = weights.const_data_ptr<float>();
  float* out_p = out.mutable_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grads.scalar_type(), "ig_accumulate_cpu", [&] {
    using G = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, act.scalar_type(), "ig_accumulate_cpu", [&] {
      using A = scalar_t;
      const G* g = grads.const_data_ptr<G>();
      const A* a = act.const_data_ptr<A>();
      at::parallel_for(0, numel, grain_for(steps), [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; p += kPiece) {
          const int64_t length = std::min(kPiece, end - p);
          // The sum is built in `out` itself (one piece, in L1), then scaled there.
          weighted_sum_piece(g + p, numel, w, steps, out_p + p, length);
          scale_piece(a + p, out_p + p, length);
        }
      });
    });
  });
  return out;
}

// act * ((sum_k w_k grad_resid[k]) @ weight_down). With AVX-512: one fused kernel (the weighted sum
// formed block by block inside the GEMM, the multiply by act on each finished tile). Elsewhere: the
// weighted sum in one streaming pass, at::mm, then the multiply.
at::Tensor ig_accumulate_linear_cpu(const at::Tensor& act_in, const at::Tensor& grad_resid_in,
                                    const at::Tensor& weight_down_in, const at::Tensor& weights_in) {
  check_ig_accumulate_linear(act_in, grad_resid_in, weight_down_in, weights_in);
  const at::Tensor act = act_in.contiguous();
  const at::Tensor grad_resid = grad_resid_in.contiguous();
  const at::Tensor weight_down = weight_down_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  at::Tensor out = empty_output(act.sizes(), act.options().dtype(at::kFloat));
  if (weighted_gemm_mul_supported(grad_resid, weight_down, act)) {
    weighted_gemm_mul(grad_resid, weights, weight_down, act, out);
    return out;
  }
  at::Tensor summed = at::empty({grad_resid.size(1), grad_resid.size(2)}, act.options().dtype(at::kFloat));
  weighted_sum(grad_resid, weights, summed);
  at::mm_out(out, summed, weight_down.to(at::kFloat));
  out.mul_(act);
  return out;
}

}  // namespace
}  // namespace fastrit::cpu

TORCH_LIBRARY_IMPL(fastrit, CPU, m) {
  m.impl("ig_interpolate", &fastrit::cpu::ig_interpolate_cpu);
  m.impl("ig_accumulate", &fastrit::cpu::ig_accumulate_cpu);
  m.impl("ig_accumulate_linear", &fastrit::cpu::ig_accumulate_linear_cpu);
}
