# The two commands of the README:
#   make demo   set up everything that is missing, then train + evaluate DINO on the embedded demo data
#   make test   set up everything that is missing, then run the test suite (what CI runs)
# Both are fast the second time: each setup step is skipped while its inputs are unchanged.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
export CUDA_HOME ?= /usr/local/cuda-13.0
# Compile the CUDA kernels whenever nvcc is there, GPU or not, so kernel breakage shows in CI.
ifneq ($(wildcard $(CUDA_HOME)/bin/nvcc),)
export FORCE_CUDA ?= 1
endif
EXT := dino_detr/_C$(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")

.PHONY: demo test lint setup clean
demo: setup
	$(PY) tools/run_demo.py

test: setup
	DINO_DETR_REQUIRE_EXT=1 $(PY) -m pytest -q tests $(PYTEST_ARGS)

# Lint and format check (settings in pyproject.toml); `ruff format .` applies the formatting.
lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

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

$(EXT): setup.py $(wildcard dino_detr/csrc/*.* dino_detr/csrc/*/*.*) $(VENV)/.deps
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build dino_detr/_C*.so *.egg-info
