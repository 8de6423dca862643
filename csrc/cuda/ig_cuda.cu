// Integrated Gradients kernels on CUDA: interpolation points, and the accumulation of the gradients at those
// points into neuron scores (directly, or through the linear output projection, whose GEMM is cuBLAS's).
// ig_interpolate is bit-exact with the reference: its multiplies and adds use the __f*_rn intrinsics, which
// nvcc never contracts into FMAs. This file also defines the op cuda_archs (the architectures csrc/cuda/ was
// built for): it must be compiled by nvcc, and a .cu file of its own would cost a minute more of build.

#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cuda/cuda_common.h"

namespace fastrit::cuda {
namespace {

// out[k, j] = base[j] + alphas[k] * direction[j]: each thread reads its element once and writes it for
// every step. Multiply and add rounded separately, as the reference (bit-exact).
template <typename T>
__global__ void ig_interpolate_kernel(const T* __restrict__ base, const T* __restrict__ direction,
                                      const float* __restrict__ alphas, int64_t steps, int64_t numel,
                                      T* __restrict__ out) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < numel;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float b = to_f32(base[j]);
    const float d = to_f32(direction[j]);
    for (int64_t k = 0; k < steps; ++k) out[k * numel + j] = from_f32<T>(__fadd_rn(b, __fmul_rn(__ldg(alphas + k), d)));
  }
}

// out[j] = (act ? act[j] : 1) * sum_k weights[k] * grads[k, j], float32.
template <typename G, typename A>
__global__ void ig_accumulate_kernel(const G* __restrict__ grads, const float* __restrict__ weights, int64_t steps,
                                     const A* __restrict__ act, int64_t numel, float* __restrict__ out) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < numel;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = 0.0f;
    for (int64_t k = 0; k < steps; ++k) acc = fmaf(__ldg(weights + k), to_f32(grads[k * numel + j]), acc);
    out[j] = act != nullptr ? to_f32(act[j]) * acc : acc;
  }
}

at::Tensor ig_interpolate_cuda(const at::Tensor& base_in, const at::Tensor& direction_in, const at::Tensor& alphas_in) {
  check_ig_interpolate(base_in, direction_in, alphas_in);
  const c10::cuda::CUDAGuard guard(base_in.device());
  const at::Tensor base = base_in.contiguous();
  const at::Tensor direction = direction_in.contiguous();
  const at::Tensor alphas = alphas_in.contiguous();
  const int64_t steps = alphas.size(0);
  at::Tensor out = at::empty({steps, base.size(0), base.size(1)}, base.options());
  const int64_t numel = base.numel();
  if (numel == 0 || steps == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, base.scalar_type(), "ig_interpolate_cuda", [&] {
    ig_interpolate_kernel<scalar_t><<<blocks_for(numel), kThreads, 0, stream>>>(
        base.const_data_ptr<scalar_t>(), direction.const_data_ptr<scalar_t>(), alphas.const_data_ptr<float>(), steps,
        numel, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// out = (act ?) * sum_k weights[k] * grads[k] over the flat [numel] slices of grads; act may be undefined.
void launch_weighted_sum(const at::Tensor& grads, const at::Tensor& weights, const at::Tensor& act, at::Tensor& out) {
  const int64_t numel = out.numel();
  if (numel == 0) return;
  const int64_t steps = weights.numel();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grads.scalar_type(), "ig_accumulate_cuda", [&] {
    using G = scalar_t;
    if (!act.defined()) {
      ig_accumulate_kernel<G, float><<<blocks_for(numel), kThreads, 0, stream>>>(
          grads.const_data_ptr<G>(), weights.const_data_ptr<float>(), steps, nullptr, numel,
          out.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, act.scalar_type(), "ig_accumulate_cuda", [&] {
      ig_accumulate_kernel<G, scalar_t><<<blocks_for(numel), kThreads, 0, stream>>>(
          grads.const_data_ptr<G>(), weights.const_data_ptr<float>(), steps, act.const_data_ptr<scalar_t>(), numel,
          out.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor ig_accumulate_cuda(const at::Tensor& act_in, const at::Tensor& grads_in, const at::Tensor& weights_in) {
  check_ig_accumulate(act_in, grads_in, weights_in);
  const c10::cuda::CUDAGuard guard(act_in.device());
  const at::Tensor act = act_in.contiguous();
  const at::Tensor grads = grads_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  at::Tensor out = at::empty(act.sizes(), act.options().dtype(at::kFloat));
  launch_weighted_sum(grads, weights, act, out);
  return out;
}

// act * ((sum_k w_k grad_resid[k]) @ weight_down): one streaming pass for the float32 [N, H] sum, the GEMM
// on cuBLAS straight into the output, then one in-place multiply by act.
at::Tensor ig_accumulate_linear_cuda(const at::Tensor& act_in, const at::Tensor& grad_resid_in,
                                     const at::Tensor& weight_down_in, const at::Tensor& weights_in) {
  check_ig_accumulate_linear(act_in, grad_resid_in, weight_down_in, weights_in);
  const c10::cuda::CUDAGuard guard(act_in.device());
  const at::Tensor act = act_in.contiguous();
  const at::Tensor grad_resid = grad_resid_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  at::Tensor summed = at::empty({grad_resid.size(1), grad_resid.size(2)}, act.options().dtype(at::kFloat));
  launch_weighted_sum(grad_resid, weights, at::Tensor(), summed);
  at::Tensor out = at::empty(act.sizes(), act.options().dtype(at::kFloat));
  at::mm_out(out, summed, weight_down_in.to(at::kFloat));
  out.mul_(act);
  return out;
}

// ---- the build's architectures (the op cuda_archs, read by fastrit.backends()) ---------------------------

// The architectures this file (and so every .cu file: setup.py compiles them with the same flags) was compiled
// for: SASS (nvcc's __CUDA_ARCH_LIST__, e.g. 800,860,900 -> 80, 86, 90) and PTX (setup.py's
// FASTRIT_CUDA_PTX_ARCH, 0 if none). __CUDA_ARCH_LIST__ names the virtual architectures compiled; reading them as
// SASS holds for the flags setup.py builds with (torch's: SASS for every listed architecture, "+PTX" adding
// PTX), not for a hand-written PTX-only -gencode.
#ifndef FASTRIT_CUDA_PTX_ARCH
#define FASTRIT_CUDA_PTX_ARCH 0
#endif

std::tuple<std::vector<int64_t>, std::vector<int64_t>> cuda_archs() {
  std::vector<int64_t> sass;
#ifdef __CUDA_ARCH_LIST__
  for (const int64_t arch : {__CUDA_ARCH_LIST__}) sass.push_back(arch / 10);
#endif
  std::vector<int64_t> ptx;
  if (FASTRIT_CUDA_PTX_ARCH > 0) ptx.push_back(FASTRIT_CUDA_PTX_ARCH);
  return {sass, ptx};
}

}  // namespace
}  // namespace fastrit::cuda

TORCH_LIBRARY_FRAGMENT(fastrit, m) { m.def("cuda_archs() -> (int[], int[])", &fastrit::cuda::cuda_archs); }

TORCH_LIBRARY_IMPL(fastrit, CUDA, m) {
  m.impl("ig_interpolate", &fastrit::cuda::ig_interpolate_cuda);
  m.impl("ig_accumulate", &fastrit::cuda::ig_accumulate_cuda);
  m.impl("ig_accumulate_linear", &fastrit::cuda::ig_accumulate_linear_cuda);
}
