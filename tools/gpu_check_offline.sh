#!/usr/bin/env bash
# tools/gpu_check.py on a bare GPU machine without network, on its own Python (torch 2.11 image): checks
# the bundle of `make gpu-bundle` (carried along: build/gpu_bundle), installs its wheels with
# pip --no-index into a temporary target, puts that, the bundle's Detectron2 sources and the repository
# on PYTHONPATH, then runs the check (which builds dino_detr._C in place for the GPU present) with the
# arguments given; `--run COMMAND ...` runs that command in the same environment instead (e.g. pytest).
# `make gpu-rehearsal` runs this very script with --dry-run. PYTHON: the interpreter (default python3);
# GPU_BUNDLE: the bundle's folder. Byte code goes to /tmp, so the carried folders stay as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUNDLE=${GPU_BUNDLE:-build/gpu_bundle}
export PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/dino_detr_pycache
"$PYTHON" tools/gpu_bundle.py --verify --dir "$BUNDLE"
SITE=$(mktemp -d /tmp/dino_detr_site.XXXXXX)
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$SITE" \
  "$BUNDLE"/wheels/*.whl
export PYTHONPATH="$PWD:$SITE:$PWD/$BUNDLE/python${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import detectron2, fvcore, pycocotools, omegaconf, hydra, torch; print('gpu-check on torch', \
torch.__version__, 'CUDA', torch.version.cuda, '| detectron2', detectron2.__version__, 'from', detectron2.__file__)"
if [ "${1:-}" = --run ]; then
  shift
  exec "$@"
fi
exec "$PYTHON" tools/gpu_check.py "$@"
