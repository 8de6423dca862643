// SwiGLU with deactivated neurons on CUDA: out = silu(gate) * up * keep, and its backward in one pass over
// (grad_out, gate, up). A 2-D grid: columns across threads (coalesced, keep read once per thread), rows
// across blocks.

#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "cuda/cuda_common.h"

namespace fastrit::cuda {
namespace {

// out = silu(gate) * up * keep. keep (bool [cols]) may be null: every neuron kept. It is multiplied as
// 1.0 / 0.0, as the reference multiplies by keep.float().
template <typename T>
__global__ void swiglu_fwd_kernel(const T* __restrict__ gate, const T* __restrict__ up, const bool* __restrict__ keep,
                                  T* __restrict__ out, int64_t rows, int64_t cols) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < cols;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float kept = keep == nullptr || keep[c] ? 1.0f : 0.0f;
    for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
      const int64_t i = r * cols + c;
      const float x = to_f32(gate[i]);
      float value = x / (1.0f + expf(-x)) * to_f32(up[i]);
      if (keep != nullptr) value = value * kept;
      out[i] = from_f32<T>(value);
    }
  }
}

// d_up = g * x * sig, d_gate = g * up * sig * (1 + x * (1 - sig)), g = grad_out * keep: one pass.
template <typename T, typename G>
__global__ void swiglu_bwd_kernel(const G* __restrict__ grad_out, const T* __restrict__ gate, const T* __restrict__ up,
                                  const bool* __restrict__ keep, T* __restrict__ d_gate, T* __restrict__ d_up,
                                  int64_t rows, int64_t cols) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < cols;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float kept = keep == nullptr || keep[c] ? 1.0f : 0.0f;
    for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
      const int64_t i = r * cols + c;
      float g = to_f32(grad_out[i]);
      if (keep != nullptr) g = g * kept;
      const float x = to_f32(gate[i]);
      const float sig = 1.0f / (1.0f + expf(-x));
      d_up[i] = from_f32<T>(g * x * sig);
      d_gate[i] = from_f32<T>(g * to_f32(up[i]) * sig * (1.0f + x * (1.0f - sig)));
    }
  }
}

const bool* keep_ptr(const std::optional<at::Tensor>& keep, at::Tensor& holder) {
  if (!keep.has_value()) return nullptr;
  holder = keep->contiguous();
  return holder.const_data_ptr<bool>();
}

at::Tensor swiglu_fwd_cuda(const at::Tensor& gate_in, const at::Tensor& up_in, const std::optional<at::Tensor>& keep) {
  check_swiglu(gate_in, up_in, keep);
  const c10::cuda::CUDAGuard guard(gate_in.device());
  const at::Tensor gate = gate_in.contiguous();
  const at::Tensor up = up_in.contiguous();
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  if (gate.numel() == 0) return out;
  at::Tensor keep_holder;
  const bool* keep_p = keep_ptr(keep, keep_holder);
  const int64_t rows = gate.size(0), cols = gate.size(1);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_fwd_cuda", [&] {
    swiglu_fwd_kernel<scalar_t><<<grid_2d(rows, cols), kThreads, 0, stream>>>(
        gate.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>(), keep_p, out.mutable_data_ptr<scalar_t>(), rows,
        cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cuda(const at::Tensor& grad_out_in, const at::Tensor& gate_in,
                                                   const at::Tensor& up_in, const std::optional<at::Tensor>& keep) {
  check_swiglu_bwd(grad_out_in, gate_in, up_in, keep);
  const c10::cuda::CUDAGuard guard(gate_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor gate = gate_in.contiguous();
  const at::Tensor up = up_in.contiguous();
  at::Tensor d_gate = at::empty(gate.sizes(), gate.options());
  at::Tensor d_up = at::empty(gate.sizes(), gate.options());
  if (gate.numel() == 0) return {d_gate, d_up};
  at::Tensor keep_holder;
  const bool* keep_p = keep_ptr(keep, keep_holder);
  const int64_t rows = gate.size(0), cols = gate.size(1);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_bwd_cuda", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "swiglu_bwd_cuda", [&] {
      swiglu_bwd_kernel<T, scalar_t><<<grid_2d(rows, cols), kThreads, 0, stream>>>(
          grad_out.const_data_ptr<scalar_t>(), gate.const_data_ptr<T>(), up.const_data_ptr<T>(), keep_p,
          d_gate.mutable_data_ptr<T>(), d_up.mutable_data_ptr<T>(), rows, cols);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {d_gate, d_up};
}

}  // namespace
}  // namespace fastrit::cuda

TORCH_LIBRARY_IMPL(fastrit, CUDA, m) {
  m.impl("swiglu_fwd", &fastrit::cuda::swiglu_fwd_cuda);
  m.impl("swiglu_bwd", &fastrit::cuda::swiglu_bwd_cuda);
}
