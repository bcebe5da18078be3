#!/usr/bin/env python
"""Mutation check of the emulated CUDA suite: plants plausible bugs in the MSDA CUDA kernels and
shows that the emulated tests catch each one.

For every mutant, a copy of dino_detr/csrc gets one edit, the host emulation is built from the copy
(tests/cuda_emulation/build.sh) and the emulated tests (test_ms_deform_attn_cuda_emulation.py, then
the emulated backend of test_ms_deform_attn_cuda.py) run against it until the first failure. A
mutant is caught when the suite fails (or crashes, or hangs past --timeout). Prints one line per
mutant and "caught X of Y"; exits 1 when a mutant survives. Needs no GPU; 1-2 minutes per mutant on 2 cores.

    python tests/cuda_emulation/mutation_check.py [--only NAME ...] [--timeout 600]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNELS = "cuda/ms_deform_attn_kernels.cuh"
VEC = "cuda/ms_deform_attn_vec_kernels.cuh"
LAUNCH = "cuda/ms_deform_attn_launch.cuh"
SAMPLE = "ms_deform_attn_sample.h"

# name: (file under dino_detr/csrc, text, replacement); every occurrence is replaced.
MUTANTS = {
    "off-by-one channel bound": (
        KERNELS,
        "for (int64_t d = lane; d < s.channels; d += s.group) {\n      acc_t acc = 0;",
        "for (int64_t d = lane; d <= s.channels; d += s.group) {\n      acc_t acc = 0;",
    ),
    "off-by-one corner bound": (SAMPLE, "in_x1 = x0 + 1 < w", "in_x1 = x0 + 1 <= w"),
    "overflowing level bound": (
        SAMPLE,
        "start <= spatial && h <= (spatial - start) / w",
        "start <= spatial && h * w <= spatial - start",
    ),
    "wrong head index": (KERNELS, "m = qm % s.heads;", "m = qm / s.queries % s.heads;"),
    "wrong shuffle mask": (
        KERNELS,
        "(((1u << s.group) - 1u) << ((threadIdx.x % 32) / s.group * s.group))",
        "((1u << s.group) - 1u)",
    ),
    "divergent shuffle": (
        KERNELS,
        "for (int c = 0; c < 4; ++c) dot[c] = group_sum(dot[c], s.group, mask);",
        "for (int c = 0; c < 4; ++c) {\n          if (lane < s.channels) dot[c] = group_sum(dot[c], s.group, mask);\n        }",
    ),
    "wrong grid stride": (
        KERNELS,
        "static_cast<int64_t>(gridDim.x) * groups_per_block;",
        "static_cast<int64_t>(gridDim.x) * blockDim.x;",
    ),
    "a lane that never writes": (
        KERNELS,
        "      out[qm * s.channels + d] = static_cast<scalar_t>(acc);",
        "      if (lane != 1) out[qm * s.channels + d] = static_cast<scalar_t>(acc);",
    ),
    "wrong gradient scale": (SAMPLE, "grad_x = a * static_cast<T>(w) * dfx;", "grad_x = a * static_cast<T>(h) * dfx;"),
    "half-precision atomics": (
        LAUNCH,
        "using grad_value_acc_t = at::opmath_type<scalar_t>;",
        "using grad_value_acc_t = scalar_t;",
    ),
    # The vectorized and deterministic variants.
    "vector tail read whole (forward)": (
        VEC,
        "static_cast<int>(std::min<int64_t>(V, s.channels - d));\n      const bool whole = vector_io && width == V;\n"
        "      acc_t acc",
        "V;\n      const bool whole = vector_io && width == V;\n      acc_t acc",
    ),
    "vector tail read whole (backward)": (
        VEC,
        "          const int width = static_cast<int>(std::min<int64_t>(V, s.channels - d));",
        "          const int width = V;",
    ),
    "vector slice start per lane": (
        VEC,
        "for (int64_t d = static_cast<int64_t>(lane) * V; d < s.channels; d += static_cast<int64_t>(s.group) * V) {\n"
        "      const int width",
        "for (int64_t d = lane; d < s.channels; d += static_cast<int64_t>(s.group) * V) {\n      const int width",
    ),
    "vector accesses on D not a multiple": (LAUNCH, "if (s.channels % kVecWidth<scalar_t> != 0) return false;", ""),
    "vector accesses misaligned": (LAUNCH, "reinterpret_cast<std::uintptr_t>(p) % 16 == 0", "true"),
    "shuffle over half the group": (
        VEC,
        "dot[c] = group_sum(dot[c], s.group, mask);",
        "dot[c] = group_sum(dot[c], s.group / 2, mask);",
    ),
    "fixed-point scale too coarse": (VEC, "return 61 - k;", "return 21 - k;"),
    "fixed-point finish misses the tail": (VEC, "i < numel;", "i < numel - 1;"),
    "non-finite contributions dropped": (VEC, "atomicAdd(overflow + index + k, x[k]);", "(void)overflow;"),
}

TESTS = ["tests/test_ms_deform_attn_cuda_emulation.py", "tests/test_ms_deform_attn_cuda.py"]


def run_mutant(name, edit, work, timeout):
    """(caught, what failed) for one mutant (``edit`` None: the unmutated copy)."""
    csrc = os.path.join(work, (name or "unmutated").replace(" ", "_"), "csrc")
    shutil.copytree(os.path.join(ROOT, "dino_detr", "csrc"), csrc)
    if edit:
        path, text, replacement = edit
        plant(os.path.join(csrc, path), text, replacement, name)
    library = os.path.join(csrc, "libmsda_emu.so")
    env = dict(os.environ, MSDA_CSRC=csrc, PYTHON=sys.executable)
    build = subprocess.run(
        [os.path.join(ROOT, "tests", "cuda_emulation", "build.sh"), library, "base"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if build.returncode != 0:  # a mutant must compile to say anything about the tests
        return False, "does not compile (update this script with the kernels): " + build.stderr[-300:]
    env = dict(os.environ, DINO_DETR_CUDA_EMU=library, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return run_tests(["-k", "not gpu", *TESTS], env, ROOT, timeout)


PYTEST_ERRORS = {2: "interrupted", 3: "internal error", 4: "usage error", 5: "no tests collected"}


def run_tests(pytest_args, env, cwd, timeout):
    """(caught, what failed): runs pytest until the first failure; a failure, crash or hang
    (> ``timeout`` s) catches the mutant. Shared with tests/model_mutation_check.py."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore", *pytest_args]
    try:
        result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return True, f"hangs (> {timeout} s)"
    if result.returncode == 0:
        return False, "all tests pass"
    if result.returncode in PYTEST_ERRORS:  # no verdict: the test run itself broke (e.g. an import error)
        return False, f"test run error (pytest: {PYTEST_ERRORS[result.returncode]}) {result.stdout[-300:]}"
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    return True, failed[0][len("FAILED ") :] if failed else f"crashes (exit {result.returncode})"


def plant(source, text, replacement, name):
    """Replaces every ``text`` in the file ``source`` (fails when it is not there: update the mutant)."""
    with open(source) as f:
        code = f.read()
    if text not in code:
        raise SystemExit(f"mutant {name!r}: {text!r} is not in {source} (update the mutant with the code)")
    with open(source, "w") as f:
        f.write(code.replace(text, replacement))


def check(names, run_mutant):
    """Runs ``run_mutant(name) -> (caught, what)`` for each name, one line each, then "caught X of Y";
    returns the exit status (1 when a mutant survives). First ``run_mutant(None)``, the unmutated copy,
    must pass its tests (exit 2 if not): otherwise no "caught" would mean anything."""
    start = time.time()
    failed, what = run_mutant(None)
    if failed or what != "all tests pass":
        print(f"the unmutated code does not pass the tests: {what[:300]}")
        return 2
    print(f"unmutated: all tests pass ({time.time() - start:.0f} s)", flush=True)
    caught = 0
    for name in names:
        start = time.time()
        was_caught, what = run_mutant(name)
        caught += was_caught
        print(
            f"{'caught  ' if was_caught else 'SURVIVED'} {name:48s} {time.time() - start:5.0f} s  {what[:150]}",
            flush=True,
        )
    print(f"caught {caught} of {len(names)}")
    return 0 if caught == len(names) else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(MUTANTS), metavar="NAME", help="run these mutants")
    parser.add_argument("--timeout", type=int, default=600, help="seconds before a mutant's test run counts as hung")
    args = parser.parse_args()
    names = args.only or list(MUTANTS)
    with tempfile.TemporaryDirectory(prefix="msda_mutants_") as work:
        return check(names, lambda name: run_mutant(name, MUTANTS.get(name), work, args.timeout))


if __name__ == "__main__":
    sys.exit(main())
