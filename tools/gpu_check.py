#!/usr/bin/env python
"""Validates the CUDA path on a machine with an NVIDIA GPU in one command (`make gpu-check`; on a bare GPU
machine without network: tools/gpu_check_offline.sh, DEVELOPERS.md "GPU check").

Steps, ordered by value (each one's output in <results>/gpu_check_<gpu>/<step>.log):
  build                       dino_detr._C built in place for the GPU present (setup.py build_ext --inplace,
                              ninja, a compile job per core, TORCH_CUDA_ARCH_LIST = the GPU's capability)
  kernel-image                the build's architectures, and its kernel-image check on this GPU
  tests                       every test file that uses CUDA; a test skipped for want of a GPU fails it
  msda-<dtype>-<case>         the op against the memory-bandwidth floor at DINO's shapes (encoder:
                              batch 2 at 800x1333; decoder: 1100 queries, batch 8), forward and backward;
                              float32 and bfloat16 here, float16 last
  model-fp32, model-bf16      tools/benchmark.py on dino_r50_4scale at 800x1333 (inference and training)
  demo                        a short training of the demo config (fp32), then its evaluation
  memcheck/racecheck/synccheck  compute-sanitizer on a small, fast subset of the CUDA op tests
Each step's record (JSON, the GPU named) and the Markdown tables go to <results>/gpu_check_<gpu>.json/.md as
soon as the step ends, and to $OUT too when that variable is set (with the logs as gpu_check_logs.tar.gz and
the running step's log as running.log), so a run cut off keeps what it finished. `--budget SECONDS` leaves
out each step whose estimate (ESTIMATES) would not fit in what is left. `--dry-run` needs no GPU: it runs the
steps before the first CUDA call (the build, for TORCH_CUDA_ARCH_LIST=9.0 standing in for an H100's) and
prints the rest. The command fails when a step fails, and at once when torch sees no GPU.

    python tools/gpu_check.py [--results projects/dino_detr/results] [--budget 450] [--demo-iters 200]
        [--only STEP ...] [--dry-run]
"""

import argparse
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
MSDA_CASES = {"encoder": 2, "decoder": 8}  # batch per case
IMAGE = ("800", "1333")
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")
# The sanitizers' subset of tests/test_ms_deform_attn_cuda.py, for each kernel variant (baseline, vectorized,
# deterministic): one float64 forward+backward against the reference, and bfloat16 against float32 (each
# kernel's launch code and both value types).
SANITIZER_TESTS = (
    "gpu and (reference_float64 and (gpu-baseline-0 or gpu-vectorized-0 or gpu-deterministic-0)"
    " or half_precision and same-dtype1)"
)
DRY_RUN_ARCH = "9.0"  # the H100 / H200 the machines have
# The original Deformable-DETR op as the kernels' peer, when a checkout's models/ops was carried here
# (fetched by hand into the ignored build/peer/, never committed; see DEVELOPERS.md).
PEER_OPS = REPO / "build" / "peer" / "models" / "ops"
KERNEL_IMAGE = (
    "import torch; from dino_detr.layers.cuda_arch import check_kernel_image; "
    "check_kernel_image(torch.device('cuda')); print(torch.ops.dino_detr.cuda_arch_list())"
)
BUDGET = 540  # the whole check in 9 minutes on one H100 (8 without the peer's build)
# Seconds each step takes on one H100 (16 cores), estimated without one (DEVELOPERS.md "GPU check" says
# how): what --budget plans with. Steps not named here take ESTIMATES["msda"].
ESTIMATES = {
    # Its 4 files compile in parallel; the two longest took 36 s of CPU each here against torch 2.11
    # (ms_deform_attn_cuda.cu for 9.0, ms_deform_attn_cpu.cpp); + link, setup.py's start and a margin.
    "build": 60,
    "kernel-image": 8,  # interpreter, torch import, CUDA context
    "tests": 45,  # these files took 25 s of CPU here (their CPU work runs there too), + CUDA start, GPU cases
    "msda": 21,  # per dtype and case: 4 fresh processes (native/reference x forward/backward) at ~4 s each, the
    # three kernel variants ~0.3 s each (100 repeats of a few ms)
    "msda-float32-encoder": 65,  # also builds the carried Deformable-DETR peer (2 files, ~45 s on 16 cores)
    "model-fp32": 40,  # model build + 23 inference and 13 training iterations of R50 at 800x1333 (~0.1-0.4 s)
    "model-bf16": 35,
    "demo": 60,  # 200 iterations of the demo model (~0.1 s each, launch-bound) + evaluation + start
    "memcheck": 50,  # pytest + torch start under the sanitizer (~20 s) + 6 tests (2 per kernel variant)
    "racecheck": 60,  # racecheck instruments every shared-memory access: the slowest
    "synccheck": 50,
}


def estimate(name: str) -> int:
    return ESTIMATES.get(name, ESTIMATES["msda"])


def gpu_test_files(tests_dir: Path) -> list:
    """The test files that run on CUDA (they skip without it)."""
    return sorted(
        str(p.relative_to(REPO)) for p in tests_dir.glob("test_*.py") if "torch.cuda.is_available()" in p.read_text()
    )


def gpu_skips(pytest_output: str) -> list:
    """The ``-rs`` lines of tests skipped for want of a GPU or CUDA ("needs a GPU ...")."""
    return [
        line
        for line in pytest_output.splitlines()
        if line.startswith("SKIPPED") and re.search(r"needs (a )?(GPU|CUDA)|CUDA is not available|no GPU", line, re.I)
    ]


def compute_sanitizer() -> str:
    """compute-sanitizer of $CUDA_HOME, else the one on PATH."""
    candidate = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "compute-sanitizer"
    return str(candidate) if candidate.exists() else (shutil.which("compute-sanitizer") or "compute-sanitizer")


def build_env(arch: str) -> dict:
    """The build's environment: CUDA kernels for ``arch`` only, a compile job per core, and ninja found
    (torch uses it when ``ninja`` is on PATH: the pip package's binary, next to this Python, counts)."""
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja

        dirs.insert(0, ninja.BIN_DIR)
    except ImportError:
        pass
    return {
        "FORCE_CUDA": "1",
        "TORCH_CUDA_ARCH_LIST": arch,
        "MAX_JOBS": str(os.cpu_count() or 1),
        "PATH": os.pathsep.join([*dirs, os.environ.get("PATH", "")]),
    }


def msda_step(out_dir: Path, dtype: str, case: str, batch: int) -> dict:
    name = f"msda-{dtype}-{case}"
    argv = [
        *(sys.executable, "tools/benchmark_ms_deform_attn.py", "--device", "cuda", "--dtype", dtype),
        *("--size", *IMAGE, "--cases", case, "--batches", str(batch), "--repeats", "100", "--threads", "1"),
        *("--json", str(out_dir / f"{name}.json"), "--markdown", str(out_dir / f"{name}.md")),
        *("--variants", "all"),
    ]
    if dtype == "float32" and PEER_OPS.is_dir():  # the peer op is float32 only
        argv += ["--peer-src", str(PEER_OPS)]
    return {"name": name, "result": str(out_dir / f"{name}.json"), "argv": argv}


def plan(out_dir: Path, demo_iters: int, arch: str = DRY_RUN_ARCH) -> list:
    """The steps, ordered by value: dicts with name, argv, env (added), result (JSON it writes), and
    ``cpu_only`` for the steps that make no CUDA call (what --dry-run runs)."""
    py = sys.executable
    pytest = [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    steps = [
        {
            "name": "build",
            "argv": [py, "setup.py", "-q", "build_ext", "--inplace"],
            "env": build_env(arch),
            "cpu_only": True,
        },
        {"name": "kernel-image", "argv": [py, "-c", KERNEL_IMAGE]},
        {"name": "tests", "argv": pytest + gpu_test_files(REPO / "tests"), "env": {"DINO_DETR_REQUIRE_EXT": "1"}},
    ]
    steps += [
        msda_step(out_dir, dtype, case, batch)
        for dtype in ("float32", "bfloat16")
        for case, batch in MSDA_CASES.items()
    ]
    for name, extra in (("model-fp32", []), ("model-bf16", ["--amp", "--amp-dtype", "bfloat16"])):
        steps.append(
            {
                "name": name,
                "result": str(out_dir / f"{name}.json"),
                "argv": [
                    *(py, "tools/benchmark.py", "--config-file", "configs/dino_r50_4scale.yaml", "--device", "cuda"),
                    *("--size", *IMAGE, "--train", "--warmup", "3", "--repeats", "20", "--no-flops", *extra),
                    *("--json", str(out_dir / f"{name}.json")),
                ],
            }
        )
    output = REPO / "output" / "gpu_check" / "demo"  # its checkpoint and visualizations stay out of results/
    steps.append(
        {
            "name": "demo",
            "result": str(output / "demo_results.json"),
            "argv": [
                *(py, "tools/run_demo.py", "--output-dir", str(output), "--num-vis", "2", "MODEL.DEVICE", "cuda"),
                *("SOLVER.MAX_ITER", str(demo_iters), "SOLVER.STEPS", f"({int(demo_iters * 0.85)},)"),
                *("SOLVER.WARMUP_ITERS", str(min(50, demo_iters // 4)), "SOLVER.CHECKPOINT_PERIOD", str(demo_iters)),
            ],
        }
    )
    for tool in SANITIZER_TOOLS:
        # Without the caching allocator every tensor is its own allocation, so memcheck sees its bounds.
        steps.append(
            {
                "name": tool,
                "argv": [
                    *(compute_sanitizer(), "--tool", tool, "--error-exitcode", "1", *pytest),
                    *("-x", "tests/test_ms_deform_attn_cuda.py", "-k", SANITIZER_TESTS),
                ],
                "env": {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
            }
        )
    steps += [msda_step(out_dir, "float16", case, batch) for case, batch in MSDA_CASES.items()]
    return steps


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_step(step: dict, log_path: Path, live_log: Optional[Path] = None) -> dict:
    """Runs a step, its output into ``live_log`` while it runs (e.g. $OUT/running.log, so a run cut off
    keeps it) and then ``log_path``; returns its record."""
    env = {**os.environ, **step.get("env", {})}
    live = live_log or log_path
    start, cpu = time.perf_counter(), _children_cpu_seconds()
    with open(live, "w") as log:
        log.write("$ " + " ".join(step["argv"]) + "\n")
        log.flush()
        try:
            rc = subprocess.run(step["argv"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        except FileNotFoundError as e:  # e.g. a CUDA toolkit without compute-sanitizer
            log.write(f"{e}\n")
            rc = 127
    if live != log_path:
        shutil.move(live, log_path)
    record = {
        "name": step["name"],
        "command": " ".join(step["argv"]),
        "returncode": rc,
        "seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(_children_cpu_seconds() - cpu, 1),  # of its processes, all cores together
        "estimate_s": estimate(step["name"]),
        "log": _shown(log_path),
    }
    output = log_path.read_text()
    if step["name"] == "tests" and rc == 0 and gpu_skips(output):
        record["returncode"], record["error"] = 1, "GPU tests skipped on a GPU machine: " + "; ".join(gpu_skips(output))
    if step["name"] == "kernel-image" and rc == 0:
        record["built_for"] = output.strip().splitlines()[-1]
    if rc == 0 and "result" in step:
        record["result"] = json.loads(Path(step["result"]).read_text())
    return record


def summary_markdown(summary: dict) -> str:
    """The numbers of a run as Markdown tables: steps, MSDA vs its floor, model, demo."""
    lines = [
        f"GPU check on {summary['gpu']} (compute capability {summary['compute_capability']}, driver "
        f"{summary['driver']}, torch {summary['torch']}, CUDA {summary['torch_cuda']}).",
        f"Command: `{summary['command']}`",
        "",
        "| step | result | seconds |",
        "|---|---|---|",
    ]
    for r in summary["steps"]:
        if "skipped" in r:
            status = f"left out ({r['skipped']})"
        elif r["returncode"] == 0:
            status = "ok"
        else:
            status = f"**failed** ({r.get('error', 'exit ' + str(r['returncode']))})"
        lines.append(f"| {r['name']} | {status} | {r.get('seconds', '-')} |")
    results = {r["name"]: r["result"] for r in summary["steps"] if "result" in r}
    msda = [(name, row) for name, result in results.items() if name.startswith("msda-") for row in result["rows"]]
    if msda:
        lines += [
            "",
            "| dtype | case (queries) | batch | pass | native ms | reference ms | floor ms | native / floor |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in msda:
            lines.append(
                f"| {name.split('-')[1]} | {r['case']} ({r['queries']}) | {r['batch']} | {r['pass']} | "
                f"{r['native_ms']:.3f} | {r['reference_ms']:.3f} | {r['bandwidth_floor_ms']:.3f} | "
                f"{r['native_over_floor']:.1f}x |"
            )
    models = [r for name, r in results.items() if name.startswith("model-")]
    if models:
        lines += ["", "| model | precision | input | inference ms | peak MiB | training s/iter (batch) | peak MiB |"]
        lines.append("|---|---|---|---|---|---|---|")
        for r in models:
            train = r.get("training", {})
            lines.append(
                f"| {r['model']} | {r.get('amp_dtype') or ('float16' if r['amp'] else 'float32')} | "
                f"{r['input'][0]}x{r['input'][1]} | "
                f"{1e3 * r['inference']['latency_s']:.1f} | {r['inference']['peak_mem_mib']:.0f} | "
                f"{train.get('iter_s', float('nan')):.3f} ({r.get('train_batch', '-')}) | "
                f"{train.get('peak_mem_mib', float('nan')):.0f} |"
            )
    demos = [(name, r) for name, r in results.items() if name.startswith("demo")]
    if demos:
        lines += ["", "| demo run | iterations | AP | AP50 | training + evaluation s |", "|---|---|---|---|---|"]
        for name, r in demos:
            lines.append(
                f"| {name} | {r['max_iter']} | {r['bbox']['AP']:.1f} | {r['bbox']['AP50']:.1f} | "
                f"{r['train_and_eval_seconds']} |"
            )
    return "\n".join(lines) + "\n"


def gpu_description(dry_run: bool = False) -> dict:
    import torch

    machine = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if dry_run:
        return {"gpu": "no GPU (dry run)", "compute_capability": DRY_RUN_ARCH, "driver": None, **machine}
    if not torch.cuda.is_available():
        sys.exit(
            "gpu-check needs an NVIDIA GPU, and torch sees none (torch.cuda.is_available() is False; "
            f"torch {torch.__version__} built for CUDA {torch.version.cuda}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}). "
            "Run it on a machine with a GPU and its driver (`--dry-run` runs what needs none); `make test` checks "
            "everything else."
        )
    props = torch.cuda.get_device_properties(0)
    driver = (
        subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if shutil.which("nvidia-smi")
        else None
    )
    return {
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "gpu_count": torch.cuda.device_count(),
        "driver": driver,
        **machine,
    }


def left_out(name: str, left: float, budget: float) -> Optional[str]:
    """Why step ``name`` is left out with ``left`` of ``budget`` seconds, or None when it fits."""
    cost = estimate(name)
    return f"estimate {cost} s > {left:.0f} s left of --budget {budget:.0f}" if cost > left else None


def select(steps: list, budget: float) -> list:
    """The plan by the estimates alone: (step, reason it is left out or None) for each step; in order, a
    step that would not fit in what is left is left out and the later, maybe smaller, ones are tried.
    A run decides the same way with the time really left before each step."""
    left, chosen = budget, []
    for step in steps:
        reason = left_out(step["name"], left, budget)
        left -= 0 if reason else estimate(step["name"])
        chosen.append((step, reason))
    return chosen


class Results:
    """The run's summary JSON, its Markdown tables and the step logs, rewritten after each step in
    the results folder and in $OUT (when set: at most 8 files come back from there, hence one tarball)."""

    def __init__(self, summary: dict, out_dir: Path, slug: str, extra_dir: Optional[str] = None):
        self.summary, self.out_dir = summary, out_dir
        self.paths = [out_dir.parent / f"gpu_check_{slug}.json"]
        self.extra = Path(extra_dir) if extra_dir else None
        if self.extra:
            self.extra.mkdir(parents=True, exist_ok=True)
            self.paths.append(self.extra / "gpu_check.json")

    @property
    def live_log(self):
        return self.extra / "running.log" if self.extra else None

    def add(self, record: dict) -> None:
        self.summary["steps"].append({"gpu": self.summary["gpu"], **record})
        for path in self.paths:
            path.write_text(json.dumps(self.summary, indent=1))
            path.with_suffix(".md").write_text(summary_markdown(self.summary))
        if self.extra:
            with tarfile.open(self.extra / "gpu_check_logs.tar.gz", "w:gz") as tar:
                for log in sorted(self.out_dir.glob("*.log")):
                    tar.add(log, arcname=log.name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(REPO / "projects" / "dino_detr" / "results"))
    parser.add_argument("--demo-iters", type=int, default=200)
    parser.add_argument(
        "--budget", type=float, default=BUDGET, help=f"seconds (default {BUDGET}); leaves out what would not fit"
    )
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps (names as listed)")
    parser.add_argument("--dry-run", action="store_true", help="run the steps before the first CUDA call (no GPU)")
    args = parser.parse_args(argv)

    machine = gpu_description(args.dry_run)
    slug = re.sub(r"[^a-z0-9]+", "_", machine["gpu"].lower()).strip("_")
    out_dir = Path(args.results).resolve() / f"gpu_check_{slug}"
    steps = plan(out_dir, args.demo_iters, arch=machine["compute_capability"])
    unknown = set(args.only or []) - {s["name"] for s in steps}
    if unknown:
        parser.error(f"unknown step(s) {sorted(unknown)}; steps: {[s['name'] for s in steps]}")
    steps = [s for s in steps if not args.only or s["name"] in args.only]

    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python tools/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = Results({**machine, "command": command, "steps": []}, out_dir, slug, os.environ.get("OUT"))
    start = time.perf_counter()
    for n, step in enumerate(steps):
        if args.dry_run and not step.get("cpu_only"):
            print(f"[gpu-check] dry run: stops before {step['name']}, the first step that needs the GPU; the rest:")
            left = args.budget - (time.perf_counter() - start)
            for rest, reason in select(steps[n:], left):
                env = " ".join(f"{k}={v}" for k, v in rest.get("env", {}).items() if k != "PATH")
                fits = f"left out: {reason}" if reason else f"~{estimate(rest['name'])} s"
                print(f"  {rest['name']} ({fits}): {env + ' ' if env else ''}{shlex.join(rest['argv'])}")
            break
        reason = left_out(step["name"], args.budget - (time.perf_counter() - start), args.budget)
        if reason:
            print(f"[gpu-check] {step['name']}: left out ({reason})", flush=True)
            results.add({"name": step["name"], "skipped": reason, "estimate_s": estimate(step["name"])})
            continue
        print(f"[gpu-check] {step['name']} (~{estimate(step['name'])} s) ...", flush=True)
        record = run_step(step, out_dir / f"{step['name']}.log", results.live_log)
        results.add(record)
        status = "ok" if record["returncode"] == 0 else f"FAILED (see {record['log']})"
        print(f"[gpu-check] {step['name']}: {status} in {record['seconds']} s", flush=True)
        if step["name"] == "build" and record["returncode"] != 0:
            break  # nothing else can run on a failed build
    failed = [r["name"] for r in results.summary["steps"] if r.get("returncode", 0) != 0]
    print(f"[gpu-check] results: {', '.join(_shown(p) for p in results.paths)}")
    if failed:
        sys.exit(f"[gpu-check] failed steps: {', '.join(failed)}")


if __name__ == "__main__":
    main()
