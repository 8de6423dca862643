# fastrit: `make test` sets up .venv from nothing and runs the tests; `make bench` runs the benchmarks.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION := 2.14.1
STAMP := $(VENV)/.fastrit-installed

.PHONY: install test bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel

# The compiled extension fastrit._C: one CUDA architecture by default (each costs minutes of nvcc);
# e.g. `make install TORCH_CUDA_ARCH_LIST="8.0;8.6;9.0"` for more.
TORCH_CUDA_ARCH_LIST ?= 9.0
MAX_JOBS ?= 2
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu)

# torch first, so that the package (and its extension) builds against the venv's torch.
$(STAMP): $(PY) setup.py $(EXT_SOURCES)
	$(PIP) install torch==$(TORCH_VERSION)
	TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" MAX_JOBS=$(MAX_JOBS) $(PIP) install --no-build-isolation -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m benchmarks.bench_attribution
	$(PY) -m benchmarks.bench_kernels

lint: $(STAMP)
	$(VENV)/bin/ruff check fastrit kernels benchmarks tests

clean:
	rm -rf $(VENV) build *.egg-info
