// Argument checks shared by the CPU and CUDA kernels of every op.
//
// The Python wrappers (fastrit/ops) validate and make inputs contiguous before calling; these checks
// make a direct torch.ops.fastrit.* call with bad arguments raise a clear error instead of crashing
// or reading out of bounds. Each check names the argument and what was expected.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastrit {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), name,
              ": expected a float32, bfloat16 or float16 tensor, got ", t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, ": expected a ", dim, "-D tensor, got shape ", t.sizes());
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t size, const char* name, const char* what) {
  TORCH_CHECK(t.size(dim) == size, name, ": expected size ", size, " (", what, ") in dimension ", dim,
              ", got shape ", t.sizes());
}

inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected a tensor on ", ref.device(), ", got one on ",
              t.device());
}

// ---- per-op checks (shapes, dtypes, devices) --------------------------------------------------------

inline void check_ig_interpolate(const at::Tensor& base, const at::Tensor& direction, const at::Tensor& alphas) {
  check_dim(base, 2, "base");
  check_float(base, "base");
  TORCH_CHECK(direction.sizes() == base.sizes(), "direction: expected the shape of base ", base.sizes(), ", got ",
              direction.sizes());
  check_dtype(direction, base.scalar_type(), "direction");
  check_dim(alphas, 1, "alphas");
  check_dtype(alphas, at::kFloat, "alphas");
  check_device(direction, base, "direction");
  check_device(alphas, base, "alphas");
}

inline void check_ig_accumulate(const at::Tensor& act, const at::Tensor& grads, const at::Tensor& weights) {
  check_dim(act, 2, "act");
  check_float(act, "act");
  check_dim(grads, 3, "grads");
  check_float(grads, "grads");
  check_dim(weights, 1, "weights");
  check_dtype(weights, at::kFloat, "weights");
  check_size(grads, 0, weights.size(0), "grads", "the number of weights");
  check_size(grads, 1, act.size(0), "grads", "act.shape[0]");
  check_size(grads, 2, act.size(1), "grads", "act.shape[1]");
  check_device(grads, act, "grads");
  check_device(weights, act, "weights");
}

inline void check_ig_accumulate_linear(const at::Tensor& act, const at::Tensor& grad_resid,
                                       const at::Tensor& weight_down, const at::Tensor& weights) {
  check_dim(act, 2, "act");
  check_float(act, "act");
  check_dim(grad_resid, 3, "grad_resid");
  check_float(grad_resid, "grad_resid");
  check_dim(weight_down, 2, "weight_down");
  check_float(weight_down, "weight_down");
  check_dim(weights, 1, "weights");
  check_dtype(weights, at::kFloat, "weights");
  check_size(grad_resid, 0, weights.size(0), "grad_resid", "the number of weights");
  check_size(grad_resid, 1, act.size(0), "grad_resid", "act.shape[0]");
  check_size(weight_down, 0, grad_resid.size(2), "weight_down", "grad_resid.shape[2]");
  check_size(weight_down, 1, act.size(1), "weight_down", "act.shape[1]");
  check_device(grad_resid, act, "grad_resid");
  check_device(weight_down, act, "weight_down");
  check_device(weights, act, "weights");
}

inline void check_keep(const std::optional<at::Tensor>& keep, const at::Tensor& gate) {
  if (!keep.has_value()) return;
  check_dim(*keep, 1, "keep");
  check_dtype(*keep, at::kBool, "keep");
  check_size(*keep, 0, gate.size(1), "keep", "gate.shape[1]");
  check_device(*keep, gate, "keep");
}

inline void check_swiglu(const at::Tensor& gate, const at::Tensor& up, const std::optional<at::Tensor>& keep) {
  check_dim(gate, 2, "gate");
  check_float(gate, "gate");
  TORCH_CHECK(up.sizes() == gate.sizes(), "up: expected the shape of gate ", gate.sizes(), ", got ", up.sizes());
  check_dtype(up, gate.scalar_type(), "up");
  check_device(up, gate, "up");
  check_keep(keep, gate);
}

inline void check_swiglu_bwd(const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& up,
                             const std::optional<at::Tensor>& keep) {
  check_swiglu(gate, up, keep);
  TORCH_CHECK(grad_out.sizes() == gate.sizes(), "grad_out: expected the shape of gate ", gate.sizes(), ", got ",
              grad_out.sizes());
  check_float(grad_out, "grad_out");
  check_device(grad_out, gate, "grad_out");
}

// grad_out [N, O] with x [N, In] (rows) or h [N, I] (cols); index [k] int64. The index range is
// checked by the backend (on the CPU here, on the GPU inside the gather kernel).
inline void check_sparse_grad(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& index,
                              const char* input_name, const char* index_name) {
  check_dim(grad_out, 2, "grad_out");
  check_float(grad_out, "grad_out");
  check_dim(input, 2, input_name);
  check_float(input, input_name);
  check_size(input, 0, grad_out.size(0), input_name, "grad_out.shape[0]");
  check_dim(index, 1, index_name);
  check_dtype(index, at::kLong, index_name);
  check_device(input, grad_out, input_name);
  check_device(index, grad_out, index_name);
}

inline void check_nf4_quantize(const at::Tensor& weight, int64_t blocksize) {
  check_float(weight, "weight");
  TORCH_CHECK(blocksize > 0, "blocksize: expected a positive block size, got ", blocksize);
}

// The number of elements of `shape` (every size >= 0).
inline int64_t check_nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                    at::IntArrayRef shape, at::ScalarType dtype) {
  check_dtype(packed, at::kByte, "packed");
  check_dtype(absmax, at::kFloat, "absmax");
  TORCH_CHECK(blocksize > 0, "blocksize: expected a positive block size, got ", blocksize);
  TORCH_CHECK(is_supported_float(dtype), "dtype: expected float32, bfloat16 or float16, got ", dtype);
  check_device(absmax, packed, "absmax");
  int64_t numel = 1;
  for (int64_t size : shape) {
    TORCH_CHECK(size >= 0, "shape: expected non-negative sizes, got ", shape);
    numel *= size;
  }
  TORCH_CHECK(packed.numel() >= (numel + 1) / 2, "packed: expected at least ", (numel + 1) / 2,
              " bytes for shape ", shape, ", got ", packed.numel());
  const int64_t blocks = (numel + blocksize - 1) / blocksize;
  TORCH_CHECK(absmax.numel() >= blocks, "absmax: expected at least ", blocks, " values (blocks of ", blocksize,
              " for shape ", shape, "), got ", absmax.numel());
  return numel;
}

}  // namespace fastrit
