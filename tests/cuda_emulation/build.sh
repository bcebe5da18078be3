#!/bin/sh
# Builds the host emulation of the MSDA CUDA kernels: build.sh OUT.so base|asan
#   base: optimized, with FMA contraction as nvcc does it (-ffp-contract=fast; -mfma on x86-64
#         CPUs that have it; aarch64 has FMA always).
#   asan: AddressSanitizer + UndefinedBehaviorSanitizer (load it with libasan preloaded), and no FMA
#         contraction (as a host compiler without FMA builds the kernels: rounding must not depend on it).
# MSDA_CSRC (default: dino_detr/csrc of this checkout) is where the kernels are read from.
set -e
OUT=${1:?output .so}
KIND=${2:?base or asan}
HERE=$(cd "$(dirname "$0")" && pwd)
CSRC=${MSDA_CSRC:-$HERE/../../dino_detr/csrc}
TORCH=$(${PYTHON:-python3} -c "import os, torch; print(os.path.dirname(torch.__file__))")
case $KIND in
  base)
    FLAGS="-O2 -ffp-contract=fast"
    if [ "$(uname -m)" = x86_64 ] && grep -qw fma /proc/cpuinfo; then FLAGS="$FLAGS -mfma"; fi ;;
  asan)
    FLAGS="-O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined -ffp-contract=off" ;;
  *) echo "build.sh: unknown kind $KIND" >&2; exit 2 ;;
esac
mkdir -p "$(dirname "$OUT")"
# _FORTIFY_SOURCE's longjmp check refuses jumps between stacks, which is what a fiber switch is.
${CXX:-g++} -std=c++17 -shared -fPIC -g -U_FORTIFY_SOURCE -Wall -Wno-unknown-pragmas $FLAGS \
  -I"$CSRC" -I"$TORCH/include" "$HERE/msda_emu.cpp" -o "$OUT" -L"$TORCH/lib" -lc10 -Wl,-rpath,"$TORCH/lib"
