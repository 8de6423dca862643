// Shared pieces of the CUDA kernels: the launch shapes (threads per block, grid-stride and 2-D grids) and the
// float conversions of the three storage dtypes.
//
// Conventions of every csrc/cuda/*.cu: inputs in float32 / bfloat16 / float16 are read and widened to float32,
// all arithmetic is float32, outputs are rounded once at the end; grid-stride loops with 64-bit indices;
// consecutive threads touch consecutive elements (coalesced). GEMMs go to cuBLAS through at::mm (float32
// operands, float32 accumulation; TF32 only if the user enabled it for torch matmuls, as for the reference).
// No --use_fast_math (setup.py): ig_interpolate and NF4 are bit-exact with the reference. Semantics:
// fastrit/ops/reference.py.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

namespace fastrit::cuda {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over `items`: enough to fill every SM several times over, no more.
inline int blocks_for(int64_t items) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t needed = (items + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, sms * 8)));
}

// A 2-D launch over a row-major [rows, cols] tensor: x over columns (coalesced), y over rows.
inline dim3 grid_2d(int64_t rows, int64_t cols) {
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

}  // namespace fastrit::cuda
