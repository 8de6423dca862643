// Weight gradients of a linear layer for chosen output rows / input columns only, on CUDA.
//
// Both are a GEMM over the N tokens with one operand restricted to k columns: those k columns are gathered
// (and widened) into a float32 [N, k] buffer in one pass, then at::mm (cuBLAS) does the float32 GEMM.

#include <torch/library.h>

#include "checks.h"
#include "cuda/cuda_common.h"

namespace fastrit::cuda {
namespace {

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

}  // namespace
}  // namespace fastrit::cuda

TORCH_LIBRARY_IMPL(fastrit, CUDA, m) {
  m.impl("row_sparse_grad", &fastrit::cuda::row_sparse_grad_cuda);
  m.impl("col_sparse_grad", &fastrit::cuda::col_sparse_grad_cuda);
}
