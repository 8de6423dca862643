# fastrit: `make test` sets up .venv from nothing and runs the tests; `make bench` runs the benchmarks; on a CUDA GPU,
# `make gpu-test` runs the GPU tests and `make gpu-bench` the one-shot GPU benchmark.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION := 2.14.1
STAMP := $(VENV)/.fastrit-installed

.PHONY: install test demo gpu-test gpu-bench bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel

# The compiled extension fastrit._C. With a GPU visible, setup.py builds for that GPU's architecture; without
# one, one architecture plus its PTX (each architecture costs minutes of nvcc; the PTX lets any newer GPU JIT
# the kernels). E.g. `make install TORCH_CUDA_ARCH_LIST="8.0;8.6;9.0"` for more (PTX of the newest is added).
ifeq ($(origin TORCH_CUDA_ARCH_LIST),undefined)
ARCH_ENV := $(shell nvidia-smi -L >/dev/null 2>&1 || echo 'TORCH_CUDA_ARCH_LIST=9.0+PTX')
else
ARCH_ENV := TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)"
endif
MAX_JOBS ?= 2
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu)

# torch first, so that the package (and its extension) builds against the venv's torch.
$(STAMP): $(PY) setup.py build_cuda.py $(EXT_SOURCES)
	$(PIP) install torch==$(TORCH_VERSION)
	$(ARCH_ENV) MAX_JOBS=$(MAX_JOBS) $(PIP) install --no-build-isolation -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The whole pipeline on the embedded default (a few minutes on a CPU); the report goes to demo-output/, replaced on
# every run.
demo: $(STAMP)
	rm -rf demo-output
	$(PY) -m fastrit demo --out demo-output

# Every GPU test (tests marked gpu: the kernels on CUDA tensors against the reference and bitsandbytes' CUDA
# kernels, every autotune config of every Triton kernel, tensors past 2**31 elements, ops on a non-default stream, the
# attribution engine on CUDA, prepare + NeuroRITTrainer steps against plain-PyTorch twins), with the Triton
# interpreter off. Needs a CUDA GPU.
gpu-test: $(STAMP)
	TRITON_INTERPRET=0 $(PY) -m pytest -q -m gpu -rs tests

# One shot for whoever is lent a GPU, within 8 minutes on an H100 (benchmarks/gpu_bench.py): versions, GPU and
# extension check, the GPU tests (as gpu-test, less the compile guard that `make test` runs), attribution at real
# shapes, the kernels at Llama-3-8B shapes on CUDA, and one tuning step at Llama-3-8B's layer shapes (4 layers) beside
# fastrit.plan_memory. Writes benchmarks/results/gpu_bench.{json,md,log}. Options go
# in GPU_BENCH_ARGS, e.g. `make gpu-bench GPU_BENCH_ARGS="--offline --out /tmp/gpu"` on a machine without network.
gpu-bench: $(STAMP)
	$(PY) -m benchmarks.gpu_bench $(GPU_BENCH_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.bench_attribution
	$(PY) -m benchmarks.bench_kernels
	$(PY) -m benchmarks.bench_reader
	$(PY) -m benchmarks.bench_mining
	$(PY) -m benchmarks.bench_prepare --rounds 3
	$(PY) -m benchmarks.bench_tune
	$(PY) -m benchmarks.bench_8b_cpu
	$(PY) -m benchmarks.bench_attribution_memory
	$(PY) -m benchmarks.bench_real

lint: $(STAMP)
	$(VENV)/bin/ruff check fastrit kernels benchmarks tests build_cuda.py setup.py

clean:
	rm -rf $(VENV) build *.egg-info
