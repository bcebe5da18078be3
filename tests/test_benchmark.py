"""tools/benchmark.py: FLOP counting of the MSDA op, the measured fields, the table and the plot, on a
small DINO and on one of Detectron2's own model-zoo configs."""

import json
import subprocess
import sys

import pytest
import torch
from fvcore.nn import FlopCountAnalysis

from dino_detr.analysis.flops import MSDA_OP_NAME, ms_deform_attn_flop_jit
from dino_detr.layers import MSDeformAttn

from child_process import child_env
from train_utils import REPO

TINY_DINO = [
    "MODEL.DINO.HIDDEN_DIM",
    "64",
    "MODEL.DINO.DIM_FEEDFORWARD",
    "128",
    "MODEL.DINO.ENC_LAYERS",
    "1",
    "MODEL.DINO.DEC_LAYERS",
    "2",
    "MODEL.DINO.NUM_QUERIES",
    "50",
    "MODEL.DINO.NUM_SELECT",
    "50",
    "MODEL.DINO.DN_NUMBER",
    "5",
]


def test_msda_flops_are_counted_not_skipped():
    embed, heads, levels, points, queries = 32, 4, 2, 3, 7
    attn = MSDeformAttn(embed, heads, levels, points).eval()
    shapes = torch.tensor([[6, 5], [3, 2]])
    start = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    value_len = int(shapes.prod(1).sum())
    query = torch.randn(2, queries, embed)
    inputs = (query, torch.rand(2, queries, levels, 2), torch.randn(2, value_len, embed), shapes, start)
    analysis = FlopCountAnalysis(attn, inputs).unsupported_ops_warnings(False)
    analysis.set_op_handle(MSDA_OP_NAME, ms_deform_attn_flop_jit)
    by_op = analysis.by_operator()
    assert MSDA_OP_NAME not in analysis.unsupported_ops()
    assert by_op[MSDA_OP_NAME.split("::")[-1]] == 2 * queries * heads * levels * points * (embed // heads) * 5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Runs the CLI on a tiny DINO (with the reference comparison and training) and on RetinaNet."""
    out = tmp_path_factory.mktemp("bench")
    common = ["--device", "cpu", "--threads", "1", "--size", "96", "128", "--warmup", "1", "--repeats", "2"]
    runs = {
        "dino": [
            "--config-file",
            str(REPO / "configs" / "dino_demo.yaml"),
            "--train",
            "--train-batch",
            "1",
            "--compare-reference",
            *common,
            "--json",
            str(out / "dino.json"),
            *TINY_DINO,
        ],
        "retinanet": [
            "--config-file",
            "zoo:COCO-Detection/retinanet_R_50_FPN_1x.yaml",
            *common,
            "--json",
            str(out / "retinanet.json"),
        ],
    }
    for args in runs.values():
        subprocess.run(
            [sys.executable, str(REPO / "tools" / "benchmark.py"), *args], check=True, cwd=REPO, env=child_env()
        )
    summary = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "benchmark.py"),
            "--summarize",
            str(out / "dino.json"),
            str(out / "retinanet.json"),
            "--markdown",
            str(out / "table.md"),
            "--plot",
            str(out / "plot.png"),
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
        text=True,
        env=child_env(),
    )
    return {name: json.loads((out / f"{name}.json").read_text()) for name in runs}, out, summary.stdout


def test_dino_fields(results):
    (by_name, _, _) = results
    dino = by_name["dino"]
    assert dino["model"] == "dino_demo" and dino["input"] == [96, 128]
    assert dino["gflops_by_op"]["ms_deform_attn"] > 0 and "dino_detr::ms_deform_attn" not in dino["skipped_ops"]
    assert dino["gflops"] >= sum(v for k, v in dino["gflops_by_op"].items() if k != "ms_deform_attn")
    assert 0 < dino["inference"]["latency_s"] < 60 and dino["inference"]["peak_mem_mib"] > 0
    assert dino["speedup_vs_reference_msda"] == pytest.approx(
        dino["inference_reference_msda"]["latency_s"] / dino["inference"]["latency_s"]
    )
    assert dino["training"]["iter_s"] > 0 and dino["train_batch"] == 1
    assert dino["command"].startswith("python tools/benchmark.py --config-file")


def test_zoo_baseline_and_summary(results):
    (by_name, out, stdout) = results
    retina = by_name["retinanet"]
    assert retina["published_ap"] and 37 < retina["params_m"] < 38.5  # RetinaNet R50-FPN: 37.7M (80 classes)
    table = (out / "table.md").read_text()
    assert table == stdout and "| dino_demo |" in table and "| retinanet_R_50_FPN |" in table
    assert "Commands:" in table and (out / "plot.png").stat().st_size > 1000
