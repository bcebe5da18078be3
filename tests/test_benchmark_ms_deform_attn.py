"""The MSDA benchmark's kernel-variant and peer parts and its L2 floor, on the CPU: variant names,
the columns and table of the variants (ratios over the baseline and the peer), the compatibility
edits of the Deformable-DETR peer build (on a stand-in folder), the bytes the corners gather
(hand-computed) and the gather micro-benchmark."""

import importlib.util

import pytest
import torch

from bandwidth import gather_bandwidth, gathered_bytes
from train_utils import REPO

spec = importlib.util.spec_from_file_location("bench", REPO / "tools" / "benchmark_ms_deform_attn.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_variant_names():
    assert bench.variant_names([]) == ()
    assert bench.variant_names(["all"]) == ("baseline", "vectorized", "deterministic")
    assert bench.variant_names(["vectorized"]) == ("baseline", "vectorized")  # the ratios' base comes along
    with pytest.raises(SystemExit, match="unknown fastest"):
        bench.variant_names(["fastest"])


def test_variant_columns_and_table():
    native = {"seconds": 0.002, "kernel_seconds": {"baseline": 0.004, "vectorized": 0.002}, "peer_seconds": 0.006}
    columns = bench.kernel_columns(native)
    assert columns["kernel_vectorized_speedup"] == pytest.approx(2.0)
    assert columns["kernel_baseline_speedup"] == pytest.approx(1.0)
    assert columns["native_speedup_over_peer"] == pytest.approx(3.0)
    assert columns["kernel_baseline_speedup_over_peer"] == pytest.approx(1.5)
    row = {"case": "encoder", "batch": 2, "pass": "forward", "l2_floor_ms": 1.0, "native_over_l2_floor": 2.0}
    row.update(columns)
    header = {"device": "cuda", "gather_bandwidth_gb_s": 3000.0}
    table = "\n".join(bench.variant_table(header, [row]))
    assert "| case | batch | pass | baseline | vectorized | peer ms | native / peer | L2 floor ms |" in table
    assert "| encoder | 2 | forward | 4.000 (1.00x) | 2.000 (2.00x) | 6.000 | 3.00x | 1.000 | 2.0x |" in table
    assert bench.variant_table({"device": "cpu"}, [{"case": "decoder"}]) == []


def test_peer_compat_edits_on_a_copy(tmp_path):
    """The peer's sources are edited in a temporary copy (removed torch APIs), never in the checkout."""
    ops = tmp_path / "ops" / "src"
    (ops / "cuda").mkdir(parents=True)
    (ops / "vision.cpp").write_text('#include "x.h"\nif (value.type().is_cuda()) {}\n')
    original = (
        "#include <THC/THCAtomics.cuh>\n"
        'AT_ASSERTM(a, "b");\n'
        'AT_DISPATCH_FLOATING_TYPES(value.type(), "f", g);\n'
        "v.data<float>();\n"
    )
    (ops / "cuda" / "k.cu").write_text(original)
    work = tmp_path / "work"
    sources = bench.peer_sources(str(tmp_path / "ops"), str(work))
    assert sorted(sources) == sorted([str(work / "src" / "vision.cpp"), str(work / "src" / "cuda" / "k.cu")])
    edited = (work / "src" / "cuda" / "k.cu").read_text()
    assert (
        edited
        == '\nTORCH_CHECK(a, "b");\nAT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "f", g);\nv.data_ptr<float>();\n'
    )
    assert "value.is_cuda()" in (work / "src" / "vision.cpp").read_text()
    assert (ops / "cuda" / "k.cu").read_text() == original
    with pytest.raises(FileNotFoundError, match="no vision.cpp"):
        bench.peer_sources(str(tmp_path), str(work))


def test_gathered_bytes():
    # N=1, Lq=2, M=1, D=4, L=1, P=2, float32: 4 samples x 4 corners x 16 bytes = 256 forward
    assert gathered_bytes(1, 2, 1, 4, 1, 2, 4, False) == 256
    assert gathered_bytes(1, 2, 1, 4, 1, 2, 4, True) == 3 * 256  # + corner reads + grad_value atomics
    # DINO's encoder at 800x1333, batch 2, float32: ~2.9 GB through the caches per forward
    queries = 100 * 167 + 50 * 84 + 25 * 42 + 13 * 21
    assert gathered_bytes(2, queries, 8, 32, 4, 4, 4, False) == pytest.approx(2.9e9, rel=0.02)


def test_gather_bandwidth_runs_on_the_cpu():
    assert gather_bandwidth(torch.device("cpu"), 128, table_bytes=2**18, rows=2**12, repeats=2) > 0
