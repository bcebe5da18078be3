#!/usr/bin/env python
"""Validates the CUDA path on a machine with an NVIDIA GPU in one command (`make gpu-check`).

Steps (each one's output in <results>/gpu_check_<gpu>/<step>.log):
  build                       rebuild dino_detr._C for the visible GPU (TORCH_CUDA_ARCH_LIST unset)
  kernel-image                the build's architectures, and its kernel-image check on this GPU
  tests                       every test file that uses CUDA; a test skipped for want of a GPU fails it
  memcheck/racecheck/synccheck  the CUDA op tests again under compute-sanitizer
  msda-<dtype>-<case>         the op against the memory-bandwidth floor at DINO's shapes (encoder:
                              batch 2 at 800x1333; decoder: 1100 queries, batch 8), forward and backward
  model-fp32, model-amp       tools/benchmark.py on dino_r50_4scale at 800x1333 (inference and training)
  demo-fp32, demo-bf16        a few hundred iterations of the demo config, then its evaluation
Every number, with the GPU named, goes to <results>/gpu_check_<gpu>.json (tables in .md). The command fails
when a step fails, and at once when torch sees no GPU.

    python tools/gpu_check.py [--results projects/dino_detr/results] [--demo-iters 300] [--only STEP ...] [--dry-run]
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "float16", "bfloat16")
MSDA_CASES = {"encoder": 2, "decoder": 8}  # batch per case
IMAGE = ("800", "1333")
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")
KERNEL_IMAGE = (
    "import torch; from dino_detr.layers.cuda_arch import check_kernel_image; "
    "check_kernel_image(torch.device('cuda')); print(torch.ops.dino_detr.cuda_arch_list())"
)


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


def plan(out_dir: Path, demo_iters: int) -> list:
    """The steps: dicts with name, argv, env (added), unset (removed), result (JSON it writes)."""
    py = sys.executable
    pytest = [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    tests = gpu_test_files(REPO / "tests")
    steps = [
        {
            "name": "build",
            "argv": [py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."],
            "env": {"FORCE_CUDA": "1"},
            "unset": ["TORCH_CUDA_ARCH_LIST"],
        },
        {"name": "kernel-image", "argv": [py, "-c", KERNEL_IMAGE]},
        {"name": "tests", "argv": pytest + tests, "env": {"DINO_DETR_REQUIRE_EXT": "1"}},
    ]
    for tool in SANITIZER_TOOLS:
        # Without the caching allocator every tensor is its own allocation, so memcheck sees its bounds.
        steps.append(
            {
                "name": tool,
                "argv": [
                    compute_sanitizer(),
                    "--tool",
                    tool,
                    "--error-exitcode",
                    "1",
                    *pytest,
                    "-x",
                    "tests/test_ms_deform_attn_cuda.py",
                ],
                "env": {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
            }
        )
    for dtype in DTYPES:
        for case, batch in MSDA_CASES.items():
            name = f"msda-{dtype}-{case}"
            steps.append(
                {
                    "name": name,
                    "result": str(out_dir / f"{name}.json"),
                    "argv": [
                        py,
                        "tools/benchmark_ms_deform_attn.py",
                        "--device",
                        "cuda",
                        "--dtype",
                        dtype,
                        "--size",
                        *IMAGE,
                        "--cases",
                        case,
                        "--batches",
                        str(batch),
                        "--repeats",
                        "100",
                        "--threads",
                        "1",
                        "--json",
                        str(out_dir / f"{name}.json"),
                        "--markdown",
                        str(out_dir / f"{name}.md"),
                    ],
                }
            )
    for name, extra in (("model-fp32", []), ("model-amp", ["--amp"])):
        steps.append(
            {
                "name": name,
                "result": str(out_dir / f"{name}.json"),
                "argv": [
                    py,
                    "tools/benchmark.py",
                    "--config-file",
                    "configs/dino_r50_4scale.yaml",
                    "--device",
                    "cuda",
                    "--size",
                    *IMAGE,
                    "--train",
                    "--warmup",
                    "3",
                    "--repeats",
                    "20",
                    *extra,
                    "--json",
                    str(out_dir / f"{name}.json"),
                ],
            }
        )
    for name, extra in (
        ("demo-fp32", []),
        ("demo-bf16", ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "bfloat16"]),
    ):
        output = REPO / "output" / "gpu_check" / name
        steps.append(
            {
                "name": name,
                "result": str(output / "demo_results.json"),
                "argv": [
                    py,
                    "tools/run_demo.py",
                    "--output-dir",
                    str(output),
                    "--num-vis",
                    "4",
                    "MODEL.DEVICE",
                    "cuda",
                    "SOLVER.MAX_ITER",
                    str(demo_iters),
                    "SOLVER.STEPS",
                    f"({int(demo_iters * 0.85)},)",
                    "SOLVER.CHECKPOINT_PERIOD",
                    str(demo_iters),
                    *extra,
                ],
            }
        )
    return steps


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def run_step(step: dict, log_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in step.get("unset", [])}
    env.update(step.get("env", {}))
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(step["argv"]) + "\n")
        log.flush()
        try:
            rc = subprocess.run(step["argv"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        except FileNotFoundError as e:  # e.g. a CUDA toolkit without compute-sanitizer
            log.write(f"{e}\n")
            rc = 127
    record = {
        "name": step["name"],
        "command": " ".join(step["argv"]),
        "returncode": rc,
        "seconds": round(time.perf_counter() - start, 1),
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
        status = "ok" if r["returncode"] == 0 else f"**failed** ({r.get('error', 'exit ' + str(r['returncode']))})"
        lines.append(f"| {r['name']} | {status} | {r['seconds']} |")
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
        lines += ["", "| model | AMP | input | inference ms | peak MiB | training s/iter (batch) | peak MiB |"]
        lines.append("|---|---|---|---|---|---|---|")
        for r in models:
            train = r.get("training", {})
            lines.append(
                f"| {r['model']} | {r['amp']} | {r['input'][0]}x{r['input'][1]} | "
                f"{1e3 * r['inference']['latency_s']:.1f} | {r['inference']['peak_mem_mib']:.0f} | "
                f"{train.get('iter_s', float('nan')):.3f} ({r.get('train_batch', '-')}) | "
                f"{train.get('peak_mem_mib', float('nan')):.0f} |"
            )
    demos = [(name, r) for name, r in results.items() if name.startswith("demo-")]
    if demos:
        lines += ["", "| demo run | iterations | AP | AP50 | training + evaluation s |", "|---|---|---|---|---|"]
        for name, r in demos:
            lines.append(
                f"| {name} | {r['max_iter']} | {r['bbox']['AP']:.1f} | {r['bbox']['AP50']:.1f} | "
                f"{r['train_and_eval_seconds']} |"
            )
    return "\n".join(lines) + "\n"


def gpu_description() -> dict:
    import torch

    if not torch.cuda.is_available():
        sys.exit(
            "gpu-check needs an NVIDIA GPU, and torch sees none (torch.cuda.is_available() is False; "
            f"torch {torch.__version__} built for CUDA {torch.version.cuda}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}). "
            "Run it on a machine with a GPU and its driver; `make test` checks everything else."
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
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(REPO / "projects" / "dino_detr" / "results"))
    parser.add_argument("--demo-iters", type=int, default=300)
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps (names as listed)")
    parser.add_argument("--dry-run", action="store_true", help="print the steps, run nothing (no GPU needed)")
    args = parser.parse_args(argv)

    machine = {"gpu": "<this GPU>"} if args.dry_run else gpu_description()
    slug = re.sub(r"[^a-z0-9]+", "_", machine["gpu"].lower()).strip("_")
    out_dir = Path(args.results).resolve() / f"gpu_check_{slug}"
    steps = plan(out_dir, args.demo_iters)
    unknown = set(args.only or []) - {s["name"] for s in steps}
    if unknown:
        parser.error(f"unknown step(s) {sorted(unknown)}; steps: {[s['name'] for s in steps]}")
    steps = [s for s in steps if not args.only or s["name"] in args.only]
    if args.dry_run:
        for step in steps:
            changes = [f"-u {k}" for k in step.get("unset", [])] + [f"{k}={v}" for k, v in step.get("env", {}).items()]
            prefix = " ".join(["env", *changes]) + " " if changes else ""
            print(f"{step['name']}: {prefix}{' '.join(step['argv'])}")
        return

    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir.parent / f"gpu_check_{slug}.json"
    summary = {**machine, "command": "python tools/gpu_check.py " + " ".join(argv or sys.argv[1:]), "steps": []}
    for step in steps:
        print(f"[gpu-check] {step['name']} ...", flush=True)
        record = run_step(step, out_dir / f"{step['name']}.log")
        summary["steps"].append(record)
        summary_path.write_text(json.dumps(summary, indent=1))
        summary_path.with_suffix(".md").write_text(summary_markdown(summary))
        status = "ok" if record["returncode"] == 0 else f"FAILED (see {record['log']})"
        print(f"[gpu-check] {step['name']}: {status} in {record['seconds']} s", flush=True)
        if step["name"] == "build" and record["returncode"] != 0:
            break  # nothing else can run on a failed build
    failed = [r["name"] for r in summary["steps"] if r["returncode"] != 0]
    print(f"[gpu-check] results: {_shown(summary_path)}")
    if failed:
        sys.exit(f"[gpu-check] failed steps: {', '.join(failed)}")


if __name__ == "__main__":
    main()
