# The two commands of the README:
#   make demo   set up everything that is missing, then train + evaluate DINO on the embedded demo data
#   make test   set up everything that is missing, then run the test suite (what CI runs)
# Both are fast the second time: each setup step is skipped while its inputs are unchanged.
#   make gpu-check   on a machine with an NVIDIA GPU: rebuild for it, GPU tests (+ compute-sanitizer),
#                    kernel and model benchmarks, demo training; numbers in projects/dino_detr/results/
#   make gpu-bundle  what a bare GPU machine without network lacks (build/gpu_bundle; DEVELOPERS.md "GPU check")
#   make gpu-rehearsal  that machine's Python 3.12 + torch 2.11 rehearsed here without a GPU

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

# The CUDA kernels compiled for the host (tests/cuda_emulation/): optimized, and with ASan + UBSan.
CUDA_EMU := build/cuda_emu/base/libmsda_emu.so build/cuda_emu/asan/libmsda_emu.so
# What a bare GPU machine without network lacks (tools/gpu_bundle.py).
GPU_BUNDLE := build/gpu_bundle
CUDA_EMU_TESTS := tests/test_ms_deform_attn_cuda.py tests/test_ms_deform_attn_cuda_emulation.py

.PHONY: demo test test-d2-main lint gpu-check gpu-bundle gpu-rehearsal setup clean cuda-emulation
demo: setup
	$(PY) tools/run_demo.py

# The GPU bundle is made too (a few MiB from PyPI): its integrity and imports are tested here, the full
# Python 3.12 + torch 2.11 rehearsal (~3 GB of wheels, a CUDA build) only by `make gpu-rehearsal`.
test: setup $(CUDA_EMU) $(GPU_BUNDLE)/MANIFEST.json
	DINO_DETR_REQUIRE_EXT=1 DINO_DETR_REQUIRE_CUDA_EMU=1 DINO_DETR_REQUIRE_BUNDLE=1 $(PY) -m pytest -q tests $(PYTEST_ARGS)
	DINO_DETR_REQUIRE_CUDA_EMU=1 DINO_DETR_CUDA_EMU=$(word 2,$(CUDA_EMU)) ASAN_OPTIONS=detect_leaks=0 \
	  LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libstdc++.so)" \
	  $(PY) -m pytest -q -p no:cacheprovider $(CUDA_EMU_TESTS) -k "not gpu and not agree and not half_precision_against"

# The same suite against another Detectron2, e.g. upstream main with its C++ ops (DEVELOPERS.md):
#   make test-d2-main D2_SRC=path/to/detectron2
# builds Detectron2 from the source checkout D2_SRC (again only when it changed) into $(D2_VENV),
# an environment holding nothing but that Detectron2: a .pth file puts this environment's packages
# (torch, ...) after its own, so its Detectron2 shadows the one here without a second torch. Its
# C++ ops are built for the CPU (and CUDA when a GPU is present). dino_detr comes from this checkout.
D2_VENV ?= build/d2-venv
D2_PY := $(D2_VENV)/bin/python
ifneq ($(filter test-d2-main,$(MAKECMDGOALS)),)
ifeq ($(and $(wildcard $(D2_SRC)/setup.py),$(wildcard $(D2_SRC)/detectron2/__init__.py)),)
$(error make test-d2-main D2_SRC=path/to/detectron2: D2_SRC must be a Detectron2 source checkout (DEVELOPERS.md))
endif
endif
test-d2-main: setup $(word 1,$(CUDA_EMU))
	test -x $(D2_PY) || $(PY) -m venv --without-pip $(D2_VENV)
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
	  "$$($(D2_PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/dino_detr_base_env.pth"
	if [ "$$(cat $(D2_VENV)/.detectron2-source 2>/dev/null)" != "$(abspath $(D2_SRC))" ] || \
	   [ -n "$$(find $(D2_SRC)/setup.py $(D2_SRC)/detectron2 -newer $(D2_VENV)/.detectron2-source -print -quit)" ]; then \
	  cd $(D2_SRC) && env -u FORCE_CUDA $(abspath $(D2_PY)) -m pip install -q --disable-pip-version-check \
	    --no-build-isolation --no-deps . && echo "$(abspath $(D2_SRC))" > $(abspath $(D2_VENV))/.detectron2-source; fi
	PYTHONPATH=$(CURDIR) $(D2_PY) -c "import sys, detectron2; from detectron2 import _C; \
	  from dino_detr.compat import has_fast_coco_eval; assert detectron2.__file__.startswith(sys.prefix) and has_fast_coco_eval(), \
	  'not the compiled Detectron2 of D2_SRC'; print('Detectron2', detectron2.__version__, 'compiled ops:', _C.__file__)"
	DINO_DETR_REQUIRE_EXT=1 DINO_DETR_REQUIRE_CUDA_EMU=1 PYTHONPATH=$(CURDIR) $(D2_PY) -m pytest -q tests $(PYTEST_ARGS)

cuda-emulation: $(CUDA_EMU)
build/cuda_emu/%/libmsda_emu.so: $(wildcard tests/cuda_emulation/*.cpp tests/cuda_emulation/*.h tests/cuda_emulation/*.sh dino_detr/csrc/*.h dino_detr/csrc/cuda/*.cuh) $(VENV)/.torch
	PYTHON=$(PY) tests/cuda_emulation/build.sh $@ $*

# Lint and format check (settings in pyproject.toml); `ruff format .` applies the formatting.
lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# tools/gpu_check.py rebuilds dino_detr._C for the GPU present itself.
gpu-check: $(VENV)/.deps $(VENV)/.detectron2
	$(PY) tools/gpu_check.py $(GPU_CHECK_ARGS)

# The bundle for a bare GPU machine (Python 3.12, torch 2.11, no network): locked wheels + Detectron2's sources.
gpu-bundle: $(GPU_BUNDLE)/MANIFEST.json
$(GPU_BUNDLE)/MANIFEST.json: tools/gpu_bundle.py tools/gpu_bundle.lock tools/install_detectron2.py $(VENV)/.deps
	$(PY) tools/gpu_bundle.py --dir $(GPU_BUNDLE)

# That machine rehearsed without a GPU: a Python 3.12 venv outside the repo (kept between runs: torch's CUDA
# wheels are ~3 GB) with torch 2.11.0 / torchvision 0.26.0 and requirements.txt's pins of what the machine's
# image has; then tools/gpu_check_offline.sh (the GPU command's script) installs the bundle with --no-index,
# builds dino_detr._C against torch 2.11 (C++ and CUDA) in its dry run, and runs the op, model and training tests.
REHEARSAL_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
REHEARSAL_VENV ?= $(HOME)/.cache/dino_detr/rehearsal-py312-torch2.11
REHEARSAL_TESTS ?= tests/test_ms_deform_attn.py tests/test_model.py tests/test_train.py tests/test_trainer_state.py
gpu-rehearsal: $(GPU_BUNDLE)/MANIFEST.json $(REHEARSAL_VENV)/.image
	PYTHON=$(REHEARSAL_VENV)/bin/python tools/gpu_check_offline.sh --dry-run --results build/gpu_rehearsal
	PYTHON=$(REHEARSAL_VENV)/bin/python DINO_DETR_REQUIRE_EXT=1 tools/gpu_check_offline.sh --run \
	  $(REHEARSAL_VENV)/bin/python -m pytest -q -p no:cacheprovider $(REHEARSAL_TESTS) $(PYTEST_ARGS)

$(REHEARSAL_VENV)/.image: requirements.txt tools/gpu_bundle.py
	test -x $(REHEARSAL_VENV)/bin/python || $(REHEARSAL_PYTHON) -m venv $(REHEARSAL_VENV)
	$(REHEARSAL_VENV)/bin/python tools/gpu_bundle.py --image-requirements > $(REHEARSAL_VENV)/image-requirements.txt
	$(REHEARSAL_VENV)/bin/python -m pip install -q torch==2.11.0 torchvision==0.26.0 \
	  -r $(REHEARSAL_VENV)/image-requirements.txt
	touch $@

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
