// The schemas of every fastrit op (the one TORCH_LIBRARY block) and the Python module fastrit._C.
//
// Kernels register per backend, one file per op family: csrc/cpu/<op>_cpu.cpp (CPU) and csrc/cuda/<op>_cuda.cu
// (CUDA; csrc/cuda/ig_cuda.cu also defines cuda_archs); the fake (meta) kernels and autograd live in Python
// (fastrit/ops/_library.py). Semantics of every op: the PyTorch oracle fastrit/ops/reference.py.

#include <Python.h>

#include <torch/library.h>

TORCH_LIBRARY(fastrit, m) {
  // Where the fake kernels and autograd of these ops are registered, so that torch can point at (and
  // import) it when an op is traced before that module was imported.
  m.set_python_module("fastrit.ops._library");

  // Integrated Gradients: the m interpolation points base + alphas[k] * direction -> [m, N, D].
  m.def("ig_interpolate(Tensor base, Tensor direction, Tensor alphas) -> Tensor");
  // act * sum_k weights[k] * grads[k] -> [N, I] float32.
  m.def("ig_accumulate(Tensor act, Tensor grads, Tensor weights) -> Tensor");
  // act * ((sum_k weights[k] * grad_resid[k]) @ weight_down) -> [N, I] float32.
  m.def("ig_accumulate_linear(Tensor act, Tensor grad_resid, Tensor weight_down, Tensor weights) -> Tensor");

  // SwiGLU with optionally deactivated neurons: silu(gate) * up * keep, and its backward.
  m.def("swiglu_fwd(Tensor gate, Tensor up, Tensor? keep) -> Tensor");
  m.def("swiglu_bwd(Tensor grad_out, Tensor gate, Tensor up, Tensor? keep) -> (Tensor, Tensor)");

  // Weight gradients of a linear layer restricted to some output rows / input columns.
  m.def("row_sparse_grad(Tensor grad_out, Tensor x, Tensor rows) -> Tensor");
  m.def("col_sparse_grad(Tensor grad_out, Tensor h, Tensor cols) -> Tensor");

  // bitsandbytes' blockwise NF4 (packed uint8 [(numel + 1) // 2, 1], absmax float32 per block).
  m.def("nf4_quantize(Tensor weight, int blocksize) -> (Tensor, Tensor)");
  m.def("nf4_dequantize(Tensor packed, Tensor absmax, int blocksize, int[] shape, ScalarType dtype) -> Tensor");
}

// `import fastrit._C` loads this library, which registers the ops above and their kernels through
// static initializers; the module itself is empty (no pybind11, the ops are reached through
// torch.ops.fastrit).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "fastrit's compiled kernels, registered as torch.ops.fastrit.*",
      -1,
      nullptr,
  };
  return PyModule_Create(&module);
}
