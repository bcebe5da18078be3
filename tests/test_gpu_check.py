"""The GPU check and the kernel benchmark's bandwidth floor, on the CPU: the bytes the op must
move (hand-computed), DINO's shapes, one benchmark measurement, the plan of `make gpu-check`
and its clear failure without a GPU."""

import importlib.util
import subprocess
import sys

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


def test_gpu_check_plan():
    steps = {s["name"]: s for s in gpu_check.plan(REPO / "results", demo_iters=300)}
    assert list(steps)[:6] == ["build", "kernel-image", "tests", "memcheck", "racecheck", "synccheck"]
    assert steps["build"]["unset"] == ["TORCH_CUDA_ARCH_LIST"]  # builds for the GPU present
    assert "tests/test_ms_deform_attn_cuda.py" in steps["tests"]["argv"]
    assert steps["racecheck"]["argv"][1:3] == ["--tool", "racecheck"]
    for dtype in ("float32", "float16", "bfloat16"):
        encoder = " ".join(steps[f"msda-{dtype}-encoder"]["argv"])
        decoder = " ".join(steps[f"msda-{dtype}-decoder"]["argv"])
        assert "--size 800 1333 --cases encoder --batches 2" in encoder
        assert "--cases decoder --batches 8" in decoder and "--device cuda" in decoder
    assert "--amp" in steps["model-amp"]["argv"] and "--amp" not in steps["model-fp32"]["argv"]
    assert "SOLVER.MAX_ITER 300" in " ".join(steps["demo-bf16"]["argv"])
    assert "SOLVER.AMP.PRECISION bfloat16" in " ".join(steps["demo-bf16"]["argv"])


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
            {"name": "msda-bfloat16-decoder", "returncode": 0, "seconds": 30.0, "result": {"rows": [msda_row]}},
            {"name": "model-amp", "returncode": 0, "seconds": 60.0, "result": model},
            {"name": "demo-bf16", "returncode": 0, "seconds": 99.0, "result": demo},
        ],
    }
    table = gpu_check.summary_markdown(summary)
    assert "GPU check on NVIDIA H200 (compute capability 9.0" in table
    assert "| racecheck | **failed** (exit 1) | 12.0 |" in table
    assert "| bfloat16 | decoder (1100) | 8 | forward | 0.500 | 5.000 | 0.050 | 10.0x |" in table
    assert "| dino_r50_4scale | True | 800x1333 | 50.0 | 1500 | 0.200 (2) | 9000 |" in table
    assert "| demo-bf16 | 300 | 41.5 | 60.2 | 95.0 |" in table
