// SwiGLU with deactivated neurons on the CPU: out = silu(gate) * up * keep, and its backward in one
// pass over (grad_out, gate, up). Float32 arithmetic in the order of reference.swiglu_forward /
// swiglu_backward; only exp differs from torch's (see exp_f32), by a few ulp.

#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_common.h"

namespace fastrit::cpu {
namespace {

// silu(x) = x / (1 + exp(-x)), written as torch's CPU kernel writes it.
FASTRIT_ALWAYS_INLINE float silu_f32(float x) { return x / (1.0f + exp_f32(-x)); }

// One contiguous piece of a row: `keep` holds 1.0 / 0.0 per column (multiplied, not selected, as the
// reference multiplies by keep.float(): inf or NaN times a dropped neuron stays NaN).
template <typename T, bool kHasKeep>
FASTRIT_CPU_CLONES void swiglu_fwd_piece(const T* __restrict gate, const T* __restrict up,
                                         const float* __restrict keep, T* __restrict out, int64_t length) {
  for (int64_t j = 0; j < length; ++j) {
    float value = silu_f32(load_f32(gate[j])) * load_f32(up[j]);
    if constexpr (kHasKeep) value = value * keep[j];
    out[j] = store_f32<T>(value);
  }
}

// d_up = g * x * sig, d_gate = g * up * sig * (1 + x * (1 - sig)), g = grad_out * keep, sig = sigmoid(x).
template <typename T, typename G, bool kHasKeep>
FASTRIT_CPU_CLONES void swiglu_bwd_piece(const G* __restrict grad_out, const T* __restrict gate,
                                         const T* __restrict up, const float* __restrict keep,
                                         T* __restrict d_gate, T* __restrict d_up, int64_t length) {
  for (int64_t j = 0; j < length; ++j) {
    float g = load_f32(grad_out[j]);
    if constexpr (kHasKeep) g = g * keep[j];
    const float x = load_f32(gate[j]);
    const float sig = 1.0f / (1.0f + exp_f32(-x));
    d_up[j] = store_f32<T>(g * x * sig);
    d_gate[j] = store_f32<T>(g * load_f32(up[j]) * sig * (1.0f + x * (1.0f - sig)));
  }
}

// keep as float32 1.0 / 0.0 (an undefined tensor when every neuron is kept).
at::Tensor keep_as_float(const std::optional<at::Tensor>& keep) {
  return keep.has_value() ? keep->to(at::kFloat).contiguous() : at::Tensor();
}

at::Tensor swiglu_fwd_cpu(const at::Tensor& gate_in, const at::Tensor& up_in, const std::optional<at::Tensor>& keep) {
  check_swiglu(gate_in, up_in, keep);
  const at::Tensor gate = gate_in.contiguous();
  const at::Tensor up = up_in.contiguous();
  at::Tensor out = empty_output(gate.sizes(), gate.options());
  const int64_t numel = gate.numel();
  if (numel == 0) return out;
  const int64_t cols = gate.size(1);
  const at::Tensor keep_f = keep_as_float(keep);
  const float* keep_p = keep_f.defined() ? keep_f.const_data_ptr<float>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_fwd_cpu", [&] {
    const scalar_t* gate_p = gate.const_data_ptr<scalar_t>();
    const scalar_t* up_p = up.const_data_ptr<scalar_t>();
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, numel, kElementwiseGrain, [&](int64_t begin, int64_t end) {
      for_each_row_piece(begin, end, cols, [&](int64_t offset, int64_t column, int64_t length) {
        if (keep_p != nullptr) {
          swiglu_fwd_piece<scalar_t, true>(gate_p + offset, up_p + offset, keep_p + column, out_p + offset, length);
        } else {
          swiglu_fwd_piece<scalar_t, false>(gate_p + offset, up_p + offset, nullptr, out_p + offset, length);
        }
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cpu(const at::Tensor& grad_out_in, const at::Tensor& gate_in,
                                                  const at::Tensor& up_in, const std::optional<at::Tensor>& keep) {
  check_swiglu_bwd(grad_out_in, gate_in, up_in, keep);
  const at::Tensor gate = gate_in.contiguous();
  const at::Tensor up = up_in.contiguous();
  // The incoming gradient may come in another float dtype (e.g. float32 into a bf16 MLP); it is read
  // as it is rather than converted first.
  const at::Tensor grad_out = grad_out_in.contiguous();
  at::Tensor d_gate = empty_output(gate.sizes(), gate.options());
  at::Tensor d_up = empty_output(gate.sizes(), gate.options());
  const int64_t numel = gate.numel();
  if (numel == 0) return {d_gate, d_up};
  const int64_t cols = gate.size(1);
  const at::Tensor keep_f = keep_as_float(keep);
  const float* keep_p = keep_f.defined() ? keep_f.const_data_ptr<float>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_bwd_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "swiglu_bwd_cpu", [&] {
      using G = scalar_t;
      const G* grad_p = grad_out.const_data_ptr<G>();
      const T* gate_p = gate.const_data_ptr<T>();
      const T* up_p = up.const_data_ptr<T>();
      T* d_gate_p = d_gate.mutable_data_ptr<T>();
      T* d_up_p = d_up.mutable_data_ptr<T>();
      at::parallel_for(0, numel, kElementwiseGrain, [&](int64_t begin, int64_t end) {
        for_each_row_piece(begin, end, cols, [&](int64_t o, int64_t column, int64_t length) {
          if (keep_p != nullptr) {
            swiglu_bwd_piece<T, G, true>(grad_p + o, gate_p + o, up_p + o, keep_p + column, d_gate_p + o, d_up_p + o,
                                         length);
          } else {
            swiglu_bwd_piece<T, G, false>(grad_p + o, gate_p + o, up_p + o, nullptr, d_gate_p + o, d_up_p + o,
                                          length);
          }
        });
      });
    });
  });
  return {d_gate, d_up};
}

}  // namespace
}  // namespace fastrit::cpu

TORCH_LIBRARY_IMPL(fastrit, CPU, m) {
  m.impl("swiglu_fwd", &fastrit::cpu::swiglu_fwd_cpu);
  m.impl("swiglu_bwd", &fastrit::cpu::swiglu_bwd_cpu);
}
