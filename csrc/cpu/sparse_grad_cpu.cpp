// Weight gradients of a linear layer for chosen output rows / input columns only, on the CPU.
//
// Both are a GEMM over the N tokens with one operand restricted to k columns: those k columns are
// gathered (and widened) into a float32 [N, k] buffer in one pass, then at::mm does the float32 GEMM.

#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_common.h"

namespace fastrit::cpu {
namespace {

void check_index_range(const at::Tensor& index, int64_t limit, const char* name) {
  const int64_t* p = index.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < index.numel(); ++j) {
    TORCH_CHECK(p[j] >= 0 && p[j] < limit, name, ": expected indices in [0, ", limit, "), got ", p[j], " at position ",
                j);
  }
}

// out[n, j] = float(src[n, index[j]]) for src [N, C] (contiguous), index [k] (checked), out [N, k].
at::Tensor gather_columns_f32(const at::Tensor& src, const at::Tensor& index) {
  const int64_t rows = src.size(0), cols = src.size(1), k = index.numel();
  at::Tensor out = empty_output({rows, k}, src.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const int64_t* idx = index.const_data_ptr<int64_t>();
  float* out_p = out.mutable_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "gather_columns_cpu", [&] {
    const scalar_t* src_p = src.const_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kElementwiseGrain / k);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* row = src_p + n * cols;
        float* o = out_p + n * k;
        for (int64_t j = 0; j < k; ++j) o[j] = load_f32(row[idx[j]]);
      }
    });
  });
  return out;
}

at::Tensor as_float(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

// [k, In] in x.dtype: grad_out[:, rows]^T @ x.
at::Tensor row_sparse_grad_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& rows_in) {
  check_sparse_grad(grad_out_in, x_in, rows_in, "x", "rows");
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor rows = rows_in.contiguous();
  check_index_range(rows, grad_out.size(1), "rows");
  const at::Tensor picked = gather_columns_f32(grad_out, rows);  // [N, k]
  return at::mm(picked.t(), as_float(x)).to(x.scalar_type());
}

// [H, k] in h.dtype: grad_out^T @ h[:, cols].
at::Tensor col_sparse_grad_cpu(const at::Tensor& grad_out_in, const at::Tensor& h_in, const at::Tensor& cols_in) {
  check_sparse_grad(grad_out_in, h_in, cols_in, "h", "cols");
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor h = h_in.contiguous();
  const at::Tensor cols = cols_in.contiguous();
  check_index_range(cols, h.size(1), "cols");
  const at::Tensor picked = gather_columns_f32(h, cols);  // [N, k]
  return at::mm(as_float(grad_out).t(), picked).to(h.scalar_type());
}

}  // namespace
}  // namespace fastrit::cpu

TORCH_LIBRARY_IMPL(fastrit, CPU, m) {
  m.impl("row_sparse_grad", &fastrit::cpu::row_sparse_grad_cpu);
  m.impl("col_sparse_grad", &fastrit::cpu::col_sparse_grad_cpu);
}
