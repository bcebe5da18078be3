# The two commands of the README:
#   make demo   set up everything that is missing, then train + evaluate DINO on the embedded demo data
#   make test   set up everything that is missing, then run the test suite (what CI runs)
# Both are fast the second time: each setup step is skipped while its inputs are unchanged.
#   make gpu-check   on a machine with an NVIDIA GPU: rebuild for it, GPU tests (+ compute-sanitizer),
#                    kernel and model benchmarks, demo training; numbers in projects/dino_detr/results/

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# The CUDA toolkit: $CUDA_HOME when it has bin/nvcc, else the one of the nvcc on PATH (nvcc names
# its own root; /usr/local/bin/nvcc may be a wrapper), else /usr/local/cuda (or the last /usr/local/cuda-*).
ifeq ($(wildcard $(CUDA_HOME)/bin/nvcc),)
CUDA_HOME := $(abspath $(patsubst TOP=%,%,$(filter TOP=%,$(shell nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1))))
endif
ifeq ($(wildcard $(CUDA_HOME)/bin/nvcc),)
CUDA_HOME := $(patsubst %/bin/nvcc,%,$(lastword $(sort $(wildcard /usr/local/cuda*/bin/nvcc))))
endif
# Compile the CUDA kernels whenever nvcc is there, GPU or not, so kernel breakage shows in CI.
ifneq ($(wildcard $(CUDA_HOME)/bin/nvcc),)
export CUDA_HOME
export FORCE_CUDA ?= 1
# Without a GPU (CI) one architecture + PTX keeps the compile short; with one, setup.py builds
# for it. A user's own TORCH_CUDA_ARCH_LIST wins; `pip install -e .` alone builds every
# architecture from Turing to Blackwell (setup.py).
ifeq ($(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU'),0)
export TORCH_CUDA_ARCH_LIST ?= 9.0+PTX
endif
endif
# Parallel compile jobs: two by default (the build shares its machine with the tests).
export MAX_JOBS ?= 2
EXT := dino_detr/_C$(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")

.PHONY: demo test lint gpu-check setup clean
demo: setup
	$(PY) tools/run_demo.py

test: setup
	DINO_DETR_REQUIRE_EXT=1 $(PY) -m pytest -q tests $(PYTEST_ARGS)

# Lint and format check (settings in pyproject.toml); `ruff format .` applies the formatting.
lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# tools/gpu_check.py rebuilds dino_detr._C for the GPU present itself.
gpu-check: $(VENV)/.deps $(VENV)/.detectron2
	$(PY) tools/gpu_check.py $(GPU_CHECK_ARGS)

setup: $(VENV)/.deps $(VENV)/.detectron2 $(EXT)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	touch $@

$(VENV)/.deps: requirements.txt $(VENV)/.torch
	$(PIP) install -q -r requirements.txt
	touch $@

$(VENV)/.detectron2: tools/install_detectron2.py $(VENV)/.deps
	$(PY) tools/install_detectron2.py
	touch $@

$(EXT): setup.py dino_detr/layers/cuda_arch.py $(wildcard dino_detr/csrc/*.* dino_detr/csrc/*/*.*) $(VENV)/.deps
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build dino_detr/_C*.so *.egg-info
