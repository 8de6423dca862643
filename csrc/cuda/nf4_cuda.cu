// bitsandbytes' blockwise NF4 on CUDA, byte for byte with bitsandbytes' CUDA kernels (reference.py, rule "cuda").
//
// Those kernels are built with fast math: subnormals flush to zero, absmax ignores NaN and starts from -FLT_MAX,
// the scale is the approximate reciprocal rcp.approx.ftz.f32 (1/0 = inf: an all-zero block scales to NaN, code
// 0), and codes count the thresholds strictly below the scaled value. The FTZ multiply and the reciprocal are
// inline PTX, so that they stay what they are whatever flags this file is compiled with.

#include <torch/library.h>

#include <cfloat>
#include <tuple>

#include "checks.h"
#include "cuda/cuda_common.h"
#include "nf4_code.h"

namespace fastrit::cuda {
namespace {

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

}  // namespace
}  // namespace fastrit::cuda

TORCH_LIBRARY_IMPL(fastrit, CUDA, m) {
  m.impl("nf4_quantize", &fastrit::cuda::nf4_quantize_cuda);
  m.impl("nf4_dequantize", &fastrit::cuda::nf4_dequantize_cuda);
}
