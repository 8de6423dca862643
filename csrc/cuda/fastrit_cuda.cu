// CUDA kernels of every fastrit op (one .cu file: each one costs minutes of nvcc per architecture).
//
// Conventions: inputs in float32 / bfloat16 / float16 are read and widened to float32, all arithmetic is
// float32, outputs are rounded once at the end; grid-stride loops with 64-bit indices; consecutive
// threads touch consecutive elements (coalesced). GEMMs go to cuBLAS through at::mm (float32 operands,
// float32 accumulation; TF32 only if the user enabled it for torch matmuls, as for the reference).
// ig_interpolate is bit-exact with the reference: its multiplies and adds use the __f*_rn intrinsics, which
// nvcc never contracts into FMAs. NF4 follows bitsandbytes' CUDA kernels (see the NF4 section). Semantics: fastrit/ops/reference.py.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <tuple>
#include <vector>

#include "checks.h"
#include "nf4_code.h"

namespace fastrit::cuda {
namespace {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over `items`: enough to fill every SM several times over, no more.
int blocks_for(int64_t items) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t needed = (items + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, sms * 8)));
}

// A 2-D launch over a row-major [rows, cols] tensor: x over columns (coalesced), y over rows.
dim3 grid_2d(int64_t rows, int64_t cols) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t x = std::max<int64_t>(1, std::min<int64_t>((cols + kThreads - 1) / kThreads, sms * 8));
  const int64_t y = std::max<int64_t>(1, std::min<int64_t>({rows, std::max<int64_t>(1, sms * 8 / x), 65535}));
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y));
}

template <typename T>
__device__ __forceinline__ float to_f32(T x) {
  return static_cast<float>(x);
}

template <typename T>
__device__ __forceinline__ T from_f32(float x) {
  return static_cast<T>(x);
}

// ---- Integrated Gradients ----------------------------------------------------------------------------

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

// ---- SwiGLU --------------------------------------------------------------------------------------------

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

// ---- sparse weight gradients ---------------------------------------------------------------------------

// out[n, j] = float(src[n, index[j]]) for src [rows, cols], out [rows, k]. An index out of [0, cols)
// fails a device-side assertion (as torch's own index kernels do; the Python wrapper has already checked
// the range) and is never read.
template <typename T>
__global__ void gather_columns_kernel(const T* __restrict__ src, int64_t cols, const int64_t* __restrict__ index,
                                      int64_t k, int64_t total, float* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / k;
    const int64_t column = index[i - n * k];
    CUDA_KERNEL_ASSERT_MSG(column >= 0 && column < cols, "fastrit sparse grad: index out of range");
    out[i] = column >= 0 && column < cols ? to_f32(src[n * cols + column]) : 0.0f;
  }
}

at::Tensor gather_columns_f32(const at::Tensor& src, const at::Tensor& index) {
  const int64_t rows = src.size(0), cols = src.size(1), k = index.numel();
  at::Tensor out = at::empty({rows, k}, src.options().dtype(at::kFloat));
  const int64_t total = out.numel();
  if (total == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "gather_columns_cuda", [&] {
    gather_columns_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        src.const_data_ptr<scalar_t>(), cols, index.const_data_ptr<int64_t>(), k, total,
        out.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor as_float(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

at::Tensor row_sparse_grad_cuda(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& rows_in) {
  check_sparse_grad(grad_out_in, x_in, rows_in, "x", "rows");
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor picked = gather_columns_f32(grad_out, rows_in.contiguous());  // [N, k]
  return at::mm(picked.t(), as_float(x)).to(x.scalar_type());
}

at::Tensor col_sparse_grad_cuda(const at::Tensor& grad_out_in, const at::Tensor& h_in, const at::Tensor& cols_in) {
  check_sparse_grad(grad_out_in, h_in, cols_in, "h", "cols");
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor h = h_in.contiguous();
  const at::Tensor picked = gather_columns_f32(h, cols_in.contiguous());  // [N, k]
  return at::mm(as_float(grad_out).t(), picked).to(h.scalar_type());
}

// ---- NF4 -----------------------------------------------------------------------------------------------
//
// On CUDA tensors fastrit reproduces bitsandbytes' CUDA kernels byte for byte (reference.py, rule "cuda"),
// which are built with fast math: subnormals flush to zero, absmax ignores NaN and starts from -FLT_MAX, the
// scale is the approximate reciprocal rcp.approx.ftz.f32 (1/0 = inf: an all-zero block scales to NaN, code
// 0), and codes count the thresholds strictly below the scaled value. The FTZ multiply and the reciprocal are
// inline PTX, so that they stay what they are whatever flags this file is compiled with.

__constant__ float c_nf4_code[16] = {FASTRIT_NF4_CODE_VALUES};
__constant__ unsigned c_nf4_thresholds[15] = {FASTRIT_NF4_CUDA_THRESHOLD_BITS};

__device__ __forceinline__ float flush_subnormal(float x) {
  return (__float_as_uint(x) & 0x7F800000u) == 0 ? x * 0.0f : x;
}

__device__ __forceinline__ float mul_ftz(float a, float b) {
  float out;
  asm("mul.rn.ftz.f32 %0, %1, %2;" : "=f"(out) : "f"(a), "f"(b));
  return out;
}

__device__ __forceinline__ float rcp_approx_ftz(float x) {
  float out;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(out) : "f"(x));
  return out;
}

// The number of thresholds strictly below v (NaN: 0). Every thread reads the same threshold at the same
// time (a constant-cache broadcast).
__device__ __forceinline__ unsigned nf4_bucket(float v) {
  unsigned q = 0;
#pragma unroll
  for (int i = 0; i < 15; ++i) q += v > __uint_as_float(c_nf4_thresholds[i]);
  return q;
}

// What a block's maximum is taken over: |x| flushed, NaN as -FLT_MAX (ignored, as fmaxf does).
__device__ __forceinline__ float nf4_magnitude(float x) {
  return x != x ? -FLT_MAX : fabsf(flush_subnormal(x));
}

// absmax of each block: one warp per block, from -FLT_MAX; the final partial block also sees its 0.0
// padding. Stored as it is (0 for an all-zero block, -FLT_MAX for a full block of NaN).
template <typename T>
__global__ void nf4_absmax_kernel(const T* __restrict__ weight, int64_t numel, int64_t blocksize, int64_t blocks,
                                  float* __restrict__ absmax) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32; b < blocks; b += warps) {
    const int64_t start = b * blocksize;
    const int64_t stop = start + blocksize < numel ? start + blocksize : numel;
    float m = stop - start < blocksize ? 0.0f : -FLT_MAX;
    for (int64_t e = start + lane; e < stop; e += 32) m = fmaxf(m, nf4_magnitude(to_f32(weight[e])));
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, offset));
    if (lane == 0) absmax[b] = m;
  }
}

// One byte (two elements) per thread: element times rcp.approx.ftz(absmax) with an FTZ multiply; the
// padding element of an odd count is 0.0, in the last element's block.
template <typename T>
__global__ void nf4_quantize_kernel(const T* __restrict__ weight, int64_t numel, int64_t blocksize,
                                    const float* __restrict__ absmax, int64_t bytes, uint8_t* __restrict__ packed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < bytes;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = 2 * i;
    // each element's own block: with an odd blocksize a byte can straddle two
    const float x0 = mul_ftz(to_f32(weight[e]), rcp_approx_ftz(absmax[e / blocksize]));
    const float x1 = e + 1 < numel ? mul_ftz(to_f32(weight[e + 1]), rcp_approx_ftz(absmax[(e + 1) / blocksize]))
                                   : mul_ftz(0.0f, rcp_approx_ftz(absmax[e / blocksize]));  // the pad, in e's block
    packed[i] = static_cast<uint8_t>((nf4_bucket(x0) << 4) | nf4_bucket(x1));
  }
}

// One byte (two elements) per thread: code[q] * absmax[block] (FTZ multiply), cast. The code table is
// copied to shared memory: threads of a warp index it at random, which the constant cache would serialise.
template <typename T>
__global__ void nf4_dequantize_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                                      int64_t numel, int64_t blocksize, T* __restrict__ out) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = c_nf4_code[threadIdx.x];
  __syncthreads();
  const int64_t bytes = (numel + 1) / 2;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < bytes;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const unsigned byte = packed[i];
    const int64_t e = 2 * i;
    out[e] = from_f32<T>(mul_ftz(code[byte >> 4], absmax[e / blocksize]));
    if (e + 1 < numel) out[e + 1] = from_f32<T>(mul_ftz(code[byte & 0xF], absmax[(e + 1) / blocksize]));
  }
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cuda(const at::Tensor& weight_in, int64_t blocksize) {
  check_nf4_quantize(weight_in, blocksize);
  const c10::cuda::CUDAGuard guard(weight_in.device());
  const at::Tensor weight = weight_in.contiguous();
  const int64_t numel = weight.numel();
  const int64_t blocks = (numel + blocksize - 1) / blocksize;
  const int64_t bytes = (numel + 1) / 2;
  at::Tensor packed = at::empty({bytes, 1}, weight.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, weight.options().dtype(at::kFloat));
  if (numel == 0) return {packed, absmax};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "nf4_quantize_cuda", [&] {
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    nf4_absmax_kernel<scalar_t><<<blocks_for(blocks * 32), kThreads, 0, stream>>>(w, numel, blocksize, blocks,
                                                                                  absmax.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    nf4_quantize_kernel<scalar_t><<<blocks_for(bytes), kThreads, 0, stream>>>(
        w, numel, blocksize, absmax.const_data_ptr<float>(), bytes, packed.mutable_data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {packed, absmax};
}

at::Tensor nf4_dequantize_cuda(const at::Tensor& packed_in, const at::Tensor& absmax_in, int64_t blocksize,
                               at::IntArrayRef shape, at::ScalarType dtype) {
  const int64_t numel = check_nf4_dequantize(packed_in, absmax_in, blocksize, shape, dtype);
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor absmax = absmax_in.contiguous();
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  if (numel == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "nf4_dequantize_cuda", [&] {
    nf4_dequantize_kernel<scalar_t><<<blocks_for((numel + 1) / 2), kThreads, 0, stream>>>(
        packed.const_data_ptr<uint8_t>(), absmax.const_data_ptr<float>(), numel, blocksize,
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// The architectures this file was compiled for: SASS (nvcc's __CUDA_ARCH_LIST__, e.g. 800,860,900 -> 80, 86,
// 90) and PTX (setup.py's FASTRIT_CUDA_PTX_ARCH, 0 if none), read by fastrit.backends() to tell whether the
// GPU at hand can run these kernels. __CUDA_ARCH_LIST__ names the virtual architectures compiled; reading
// them as SASS holds for the flags setup.py builds with (torch's: SASS for every listed architecture, "+PTX"
// adding PTX), not for a hand-written PTX-only -gencode.
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
  m.impl("swiglu_fwd", &fastrit::cuda::swiglu_fwd_cuda);
  m.impl("swiglu_bwd", &fastrit::cuda::swiglu_bwd_cuda);
  m.impl("row_sparse_grad", &fastrit::cuda::row_sparse_grad_cuda);
  m.impl("col_sparse_grad", &fastrit::cuda::col_sparse_grad_cuda);
  m.impl("nf4_quantize", &fastrit::cuda::nf4_quantize_cuda);
  m.impl("nf4_dequantize", &fastrit::cuda::nf4_dequantize_cuda);
}
