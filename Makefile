# The two commands a new user runs: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CPU machines take the pinned CPU wheel; on a CUDA machine set TORCH_SPEC to a CUDA build.
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 4
# The test suite also runs the DeepSpeed and Megatron-core integration tests on CPU.
EXTRAS ?= dev,deepspeed,megatron
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

.PHONY: demo test install build cuda-check bench clean

$(VENV)/.installed: setup.py pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q ninja numpy
	HECATE_SKIP_EXT=1 $(PIP) install -q --no-build-isolation -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# Rebuild hecate/_C*.so in place when a C++/CUDA source changes (ninja keeps objects in build/).
hecate/.built: $(VENV)/.installed $(CSRC)
	flock .build.lock $(PY) setup.py -q build_ext --inplace
	touch $@

build: hecate/.built

# Compile every CUDA source for sm_80 and sm_90 even where no GPU runs them.
cuda-check:
	@bash tools/cuda_check.sh

demo: build
	$(PY) -m hecate.cli demo --nproc $(NPROC)

test: build cuda-check
	$(PY) -m pytest -q tests

bench: build
	$(PY) benchmarks/ops.py
	$(PY) benchmarks/collectives.py --nproc $(NPROC)

clean:
	rm -rf build hecate/_C*.so hecate/.built
