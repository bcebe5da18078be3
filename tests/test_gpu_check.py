"""The GPU check and the kernel benchmark's bandwidth floor, on the CPU: the bytes the op must
move (hand-computed), DINO's shapes, one benchmark measurement, the plan of `make gpu-check`
and its clear failure without a GPU."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile

import pytest
import torch

from bandwidth import copy_bandwidth, ms_deform_attn_bytes, value_rows_read
from child_process import child_env
from train_utils import REPO


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _tool("benchmark_ms_deform_attn")
gpu_check = _tool("gpu_check")


def test_bytes_the_op_must_move():
    # N=1, S=10, Lq=2, M=1, D=4, L=1, P=2, float32 everywhere:
    #   forward  = value 40*4 + locations 8*4 + weights 4*4 + shapes and starts 3*8 + output 8*4 = 264
    #   backward = reads (grad_output 32 + value 160 + locations 32 + weights 16 + 24)
    #            + writes (grad_value 160 + grad_locations 32 + grad_weights 16)          = 472
    assert ms_deform_attn_bytes(1, 10, 2, 1, 4, 1, 2, 4, 4, 4) == (264, 472)
    # half value, float32 locations and weights: value and output at 2 bytes
    assert ms_deform_attn_bytes(1, 10, 2, 1, 4, 1, 2, 2, 4, 4) == (80 + 32 + 16 + 24 + 16, 168 + 80 + 32 + 16)


def test_value_rows_the_samples_touch():
    """One 2x2 level, two heads, two points each: the corners inside the map, counted once."""
    shapes, starts = torch.tensor([[2, 2]]), torch.tensor([0])
    locations = torch.tensor(
        [
            [(0.5, 0.5), (0.1, 0.1)],  # head 0: all 4 pixels; then pixel (0, 0) again
            [(0.1, 0.1), (0.9, 0.1)],
        ]
    )  # head 1: pixel (0, 0); pixel (x=1, y=0)
    assert value_rows_read(shapes, starts, locations.view(1, 1, 2, 1, 2, 2)) == 4 + 2
    assert value_rows_read(shapes, starts, torch.full((1, 1, 2, 1, 2, 2), 2.0)) == 0  # outside: nothing
    # forward with those 6 rows of D=4 float32 instead of the whole value (2 heads * 4 positions)
    forward, _ = ms_deform_attn_bytes(1, 4, 1, 2, 4, 1, 2, 4, 4, 4, rows_read=6)
    assert forward == 6 * 16 + 8 * 4 + 4 * 4 + 24 + 8 * 4


def test_dino_shapes():
    assert bench.feature_levels(800, 1333) == [(100, 167), (50, 84), (25, 42), (13, 21)]
    assert bench.feature_levels(800, 1216) == [(100, 152), (50, 76), (25, 38), (13, 19)]  # msda_cpu.json's
    assert bench.num_queries("encoder", bench.feature_levels(800, 1333)) == 100 * 167 + 50 * 84 + 25 * 42 + 13 * 21


def test_benchmark_measures_a_case_and_its_floor_on_the_cpu():
    levels = bench.feature_levels(32, 48)
    result = bench.run_case("native", "decoder", 1, True, levels, "cpu", "float32", repeats=1, threads=1)
    _, shapes, starts, locations, _ = bench.make_inputs("decoder", 1, levels, "cpu", torch.float32)
    spatial = sum(h * w for h, w in levels)
    rows = value_rows_read(shapes, starts, locations)
    assert 0 < rows <= spatial * 8
    assert result["bytes"] == sum(ms_deform_attn_bytes(1, spatial, 1100, 8, 32, 4, 4, 4, 4, 4, rows_read=rows))
    assert result["seconds"] > 0
    assert copy_bandwidth(torch.device("cpu"), 2**20, repeats=3) > 0


def test_gpu_check_plan_is_ordered_by_value():
    steps = {s["name"]: s for s in gpu_check.plan(REPO / "results", demo_iters=200, arch="9.0")}
    assert list(steps) == [
        "build",
        "kernel-image",
        "tests",
        *(f"msda-{dtype}-{case}" for dtype in ("float32", "bfloat16") for case in ("encoder", "decoder")),
        "model-fp32",
        "model-bf16",
        "demo",
        "memcheck",
        "racecheck",
        "synccheck",
        "msda-float16-encoder",
        "msda-float16-decoder",
    ]
    # Built in place for the GPU present (its capability), a compile job per core; only the build needs no GPU.
    assert steps["build"]["argv"][1:] == ["setup.py", "-q", "build_ext", "--inplace"]
    assert steps["build"]["env"]["TORCH_CUDA_ARCH_LIST"] == "9.0" and steps["build"]["env"]["FORCE_CUDA"] == "1"
    assert steps["build"]["env"]["MAX_JOBS"] == str(os.cpu_count())
    assert [name for name, s in steps.items() if s.get("cpu_only")] == ["build"]
    assert "tests/test_ms_deform_attn_cuda.py" in steps["tests"]["argv"]
    assert steps["racecheck"]["argv"][1:3] == ["--tool", "racecheck"]
    assert steps["memcheck"]["argv"][-1] == gpu_check.SANITIZER_TESTS
    for dtype in ("float32", "float16", "bfloat16"):
        encoder = " ".join(steps[f"msda-{dtype}-encoder"]["argv"])
        decoder = " ".join(steps[f"msda-{dtype}-decoder"]["argv"])
        assert "--size 800 1333 --cases encoder --batches 2" in encoder
        assert "--cases decoder --batches 8" in decoder and "--device cuda" in decoder
    assert (
        "--amp-dtype bfloat16" in " ".join(steps["model-bf16"]["argv"]) and "--amp" not in steps["model-fp32"]["argv"]
    )
    assert "SOLVER.MAX_ITER 200" in " ".join(steps["demo"]["argv"])
    # Within the default budget of 9 minutes on one H100 by the per-step estimates: all but (some of) the last,
    # float16's benchmark.
    chosen = gpu_check.select(list(steps.values()), gpu_check.BUDGET)
    assert {s["name"] for s, reason in chosen if reason} <= {"msda-float16-encoder", "msda-float16-decoder"}
    assert gpu_check.BUDGET == 9 * 60


def test_sanitizer_subset_selects_two_gpu_tests_per_kernel():
    """The sanitizers' -k expression picks exactly one float64 and one bfloat16 GPU test of each kernel."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
        + ["tests/test_ms_deform_attn_cuda.py", "-k", gpu_check.SANITIZER_TESTS],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    selected = [line for line in run.stdout.splitlines() if "::" in line]
    kernels = ("baseline", "vectorized", "deterministic")
    assert sorted(selected) == sorted(
        [
            f"tests/test_ms_deform_attn_cuda.py::test_cuda_forward_backward_match_reference_float64[gpu-{k}-0]"
            for k in kernels
        ]
        + [
            f"tests/test_ms_deform_attn_cuda.py::test_half_precision_against_float32[gpu-{k}-same-dtype1-0.02]"
            for k in kernels
        ]
    ), run.stdout + run.stderr


def test_budget_leaves_out_what_would_not_fit(monkeypatch):
    monkeypatch.setattr(gpu_check, "ESTIMATES", {"a": 50, "b": 40, "c": 10, "msda": 20})
    chosen = gpu_check.select([{"name": n} for n in ("a", "b", "c")], budget=70)
    assert [(s["name"], reason is None) for s, reason in chosen] == [("a", True), ("b", False), ("c", True)]
    assert "estimate 40 s > 20 s left of --budget 70" in chosen[1][1]


def test_dry_run_writes_each_step_as_it_ends_and_stops_at_the_first_cuda_step(tmp_path, monkeypatch, capsys):
    """--dry-run runs the steps that need no GPU, writes their records into the results folder and $OUT
    (JSON, Markdown, the logs' tarball) and stops before the first step that needs one."""
    out = tmp_path / "out"
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.setattr(gpu_check, "ESTIMATES", {"first": 5, "too-long": 1000, "msda": 20})

    def fake_plan(out_dir, demo_iters, arch):
        step = lambda name, code, cpu_only=True: {  # noqa: E731
            "name": name,
            "argv": [sys.executable, "-c", code],
            "cpu_only": cpu_only,
        }
        return [
            step("first", "print('built for', 42)"),
            step("too-long", "raise SystemExit(3)"),
            step("gpu", "", False),
        ]

    monkeypatch.setattr(gpu_check, "plan", fake_plan)
    gpu_check.main(["--dry-run", "--budget", "100", "--results", str(tmp_path / "results")])
    printed = capsys.readouterr().out
    assert "stops before gpu, the first step that needs the GPU" in printed
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary == json.loads((tmp_path / "results" / "gpu_check_no_gpu_dry_run.json").read_text())
    assert summary["gpu"] == "no GPU (dry run)" and summary["torch"] == torch.__version__
    first, too_long = summary["steps"]
    assert first["name"] == "first" and first["returncode"] == 0 and first["gpu"] == "no GPU (dry run)"
    assert re.fullmatch(r"estimate 1000 s > (99|100) s left of --budget 100", too_long["skipped"])
    assert "| first | ok |" in (out / "gpu_check.md").read_text()
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        assert tar.getnames() == ["first.log"]
        assert "built for 42" in tar.extractfile("first.log").read().decode()
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "gpu_check_logs.tar.gz"]


def test_gpu_tests_skipped_on_a_gpu_machine_are_failures():
    output = (
        "SKIPPED [12] tests/test_ms_deform_attn_cuda.py:12: needs a GPU and dino_detr._C\n"
        "SKIPPED [1] tests/test_x.py:3: scipy missing\n"
        "SKIPPED [1] tests/test_gpu_check.py:74: checks the failure without a GPU\n1 passed, 14 skipped\n"
    )
    assert gpu_check.gpu_skips(output) == [output.splitlines()[0]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure without a GPU")
def test_gpu_check_fails_clearly_without_a_gpu():
    run = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gpu_check.py")], capture_output=True, text=True, env=child_env()
    )
    assert run.returncode == 1
    assert "gpu-check needs an NVIDIA GPU, and torch sees none" in run.stderr


def test_gpu_check_summary_tables():
    msda_row = {
        "case": "decoder",
        "queries": 1100,
        "batch": 8,
        "pass": "forward",
        "native_ms": 0.5,
        "reference_ms": 5.0,
        "bandwidth_floor_ms": 0.05,
        "native_over_floor": 10.0,
    }
    model = {
        "model": "dino_r50_4scale",
        "amp": True,
        "amp_dtype": "bfloat16",
        "input": [800, 1333],
        "train_batch": 2,
        "inference": {"latency_s": 0.05, "peak_mem_mib": 1500.0},
        "training": {"iter_s": 0.2, "peak_mem_mib": 9000.0},
    }
    demo = {"bbox": {"AP": 41.5, "AP50": 60.25}, "train_and_eval_seconds": 95.0, "max_iter": 300}
    summary = {
        "gpu": "NVIDIA H200",
        "compute_capability": "9.0",
        "driver": "570.1",
        "torch": "2.14.1",
        "torch_cuda": "13.0",
        "command": "python tools/gpu_check.py",
        "steps": [
            {"name": "racecheck", "returncode": 1, "seconds": 12.0},
            {"name": "synccheck", "skipped": "estimate 40 s > 3 s left of --budget 450"},
            {"name": "msda-bfloat16-decoder", "returncode": 0, "seconds": 30.0, "result": {"rows": [msda_row]}},
            {"name": "model-bf16", "returncode": 0, "seconds": 60.0, "result": model},
            {"name": "demo", "returncode": 0, "seconds": 99.0, "result": demo},
        ],
    }
    table = gpu_check.summary_markdown(summary)
    assert "GPU check on NVIDIA H200 (compute capability 9.0" in table
    assert "| racecheck | **failed** (exit 1) | 12.0 |" in table
    assert "| synccheck | left out (estimate 40 s > 3 s left of --budget 450) | - |" in table
    assert "| bfloat16 | decoder (1100) | 8 | forward | 0.500 | 5.000 | 0.050 | 10.0x |" in table
    assert "| dino_r50_4scale | bfloat16 | 800x1333 | 50.0 | 1500 | 0.200 (2) | 9000 |" in table
    assert "| demo | 300 | 41.5 | 60.2 | 95.0 |" in table
