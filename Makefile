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

# torch first, so that the package (and later its extension) builds against the venv's torch.
$(STAMP): $(PY) setup.py
	$(PIP) install torch==$(TORCH_VERSION)
	$(PIP) install --no-build-isolation -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m benchmarks.bench_attribution

lint: $(STAMP)
	$(VENV)/bin/ruff check fastrit benchmarks tests

clean:
	rm -rf $(VENV) build *.egg-info
