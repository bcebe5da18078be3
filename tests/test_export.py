"""Export of the whole detector (torch.export, AOTInductor, ONNX): each artefact equals eager
DINO on image sizes other than the export example, reloads in a fresh process, and bad input
gets a clear error. One export per format is shared by the tests (module-scoped fixtures)."""

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

from dino_detr import get_dino_cfg
from dino_detr.export import (
    DetectorForExport,
    ExportError,
    build_runtime,
    compile_aoti,
    example_inputs,
    export_detector,
    export_onnx,
    op_library_path,
    save_program,
)
from dino_detr.layers import native_extension_available

from child_process import child_env

pytestmark = pytest.mark.skipif(not native_extension_available(), reason="dino_detr._C is not built")

EXAMPLE_SIZE = (352, 384)
# Sizes the tests run, none equal to the example: (batch, H, W).
SIZES = [(2, 384, 320), (1, 320, 416)]
TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    cfg = get_dino_cfg(REPO / "configs" / "dino_demo.yaml", ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    # Random init scores every query almost alike; spread the class logits so the ranking is clear.
    with torch.no_grad():
        model.class_embed[0].weight.mul_(20)
    return model


@pytest.fixture(scope="module")
def program(model):
    with torch.no_grad():
        return export_detector(model, EXAMPLE_SIZE)


@pytest.fixture(scope="module")
def cases(model):
    """Inputs of every size in SIZES with the eager outputs."""
    result = []
    for i, (batch, h, w) in enumerate(SIZES):
        images, sizes = example_inputs(h, w, batch, seed=i + 1)
        with torch.no_grad():
            result.append(((images, sizes), DetectorForExport(model)(images, sizes)))
    return result


def assert_same_detections(outputs, expected):
    """Scores equal within TOL rank by rank, and each detection is an eager one (same class, box
    within TOL) of that score: detections whose scores tie (equal queries) may come in any order."""
    boxes, scores, classes = (torch.as_tensor(np.asarray(o)) for o in outputs)
    torch.testing.assert_close(scores, expected[1], rtol=0, atol=TOL)
    for i, j in np.ndindex(*scores.shape):
        ties = (expected[1][i] - scores[i, j]).abs() <= TOL
        box_error = (expected[0][i][ties & (expected[2][i] == classes[i, j])] - boxes[i, j]).abs().amax(-1)
        assert box_error.numel() and box_error.min() <= TOL, (i, j, box_error)


def run_fresh(tmp_path, script, *args, env=None):
    """Runs ``script`` in a new Python process outside the repository; returns (returncode, output)."""
    path = tmp_path / "run.py"
    path.write_text(textwrap.dedent(script))
    proc = subprocess.run(
        [sys.executable, str(path), *map(str, args)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={k: v for k, v in (env or os.environ).items() if k != "PYTHONPATH"},
        timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr


def save_cases(tmp_path, cases):
    for i, ((images, sizes), _) in enumerate(cases):
        np.save(tmp_path / f"images{i}.npy", images.numpy())
        np.save(tmp_path / f"sizes{i}.npy", sizes.numpy())


def load_outputs(tmp_path, cases):
    return [[np.load(tmp_path / f"out{i}_{k}.npy") for k in range(3)] for i in range(len(cases))]


def assert_fresh_run_matches(tmp_path, cases, script, *args):
    """Saves ``cases``, runs ``script`` on them in a new process and compares its outputs with eager's."""
    save_cases(tmp_path, cases)
    code, out = run_fresh(tmp_path, script, *args, len(cases))
    assert code == 0, out
    for outputs, (_, expected) in zip(load_outputs(tmp_path, cases), cases):
        assert_same_detections(outputs, expected)


# Runs every saved case through a torch artefact; the project's Python code must not be imported.
TORCH_RUNNER = """
    import sys
    import numpy as np
    import torch
    library, kind, path, count = sys.argv[1:]
    torch.set_grad_enabled(False)
    if library != "-":
        torch.ops.load_library(library)
    run = torch._inductor.aoti_load_package(path) if kind == "aoti" else torch.export.load(path).module()
    for i in range(int(count)):
        inputs = [torch.from_numpy(np.load(f"{name}{i}.npy")) for name in ("images", "sizes")]
        for k, out in enumerate(run(*inputs)):
            np.save(f"out{i}_{k}.npy", out.numpy())
    assert not any(m.startswith("dino_detr") for m in sys.modules), "project code was imported"
"""


def test_export_wrapper_is_detectron2_inference(model):
    """The documented preprocessing (normalize, zero-pad) + DetectorForExport give what
    DinoDetr.forward gives on a Detectron2 input (there, boxes are clipped and empty ones dropped)."""
    image = torch.randint(0, 256, (3, 320, 352), generator=torch.Generator().manual_seed(0)).float()
    with torch.no_grad():
        instances = model([{"image": image}])[0]["instances"]
        normalized = (image - model.pixel_mean) / model.pixel_std
        boxes, scores, classes = DetectorForExport(model)(normalized[None], torch.tensor([[320, 352]]))
    boxes = boxes[0].clone()
    boxes[:, 0::2].clamp_(0, 352)
    boxes[:, 1::2].clamp_(0, 320)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    torch.testing.assert_close(instances.pred_boxes.tensor, boxes[keep])
    torch.testing.assert_close(instances.scores, scores[0][keep])
    assert torch.equal(instances.pred_classes, classes[0][keep])


def test_torch_export_graph_and_reload(program, cases, tmp_path):
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("dino_detr.ms_deform_attn.default") == 5  # 2 encoder + 3 decoder layers
    for inputs, expected in cases:
        with torch.no_grad():
            assert_same_detections(program.module()(*inputs), expected)
    path = save_program(program, tmp_path / "dino.pt2")
    assert_fresh_run_matches(tmp_path, cases, TORCH_RUNNER, op_library_path(), "export", path)


def test_torch_export_rejects_sizes_outside_the_range(program, model):
    with pytest.raises(ValueError, match="height 1376 is outside the exported sizes"):
        export_detector(model, (1376, 320))
    images, sizes = example_inputs(1376, 320)
    with pytest.raises(Exception, match="1344"), torch.no_grad():
        program.module()(images, sizes)


class DataDependentBackbone(nn.Module):
    """Runs the demo backbone only when its input is not constant: a branch on data, which
    torch.export cannot trace."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.std() > 0:
            return self.inner(x)
        raise ValueError("constant image")


def test_export_names_a_backbone_that_cannot_export(model):
    inner = model.backbone
    model.backbone = DataDependentBackbone(inner)
    try:
        with pytest.raises(ExportError, match="the backbone DataDependentBackbone .* cannot be exported"):
            export_detector(model, EXAMPLE_SIZE)
    finally:
        model.backbone = inner


@pytest.fixture(scope="module")
def aoti_package(program, tmp_path_factory):
    path = tmp_path_factory.mktemp("aoti") / "dino_aoti.pt2"
    return compile_aoti(program, path, optimize=False)  # -O0: a faster build for CI


def test_aoti_package_runs_in_a_fresh_process_with_only_the_op_library(aoti_package, cases, tmp_path):
    assert_fresh_run_matches(tmp_path, cases, TORCH_RUNNER, op_library_path(), "aoti", aoti_package)


def test_aoti_package_errors_name_the_missing_op_and_a_bad_size(aoti_package, tmp_path):
    save_cases(tmp_path, [(example_inputs(320, 320, 1), None)])
    code, out = run_fresh(tmp_path, TORCH_RUNNER, "-", "aoti", aoti_package, 1)
    assert code != 0 and "dino_detr::ms_deform_attn" in out, out
    save_cases(tmp_path, [(example_inputs(1376, 320, 1), None)])
    env = dict(os.environ, AOTI_RUNTIME_CHECK_INPUTS="1")
    code, out = run_fresh(tmp_path, TORCH_RUNNER, op_library_path(), "aoti", aoti_package, 1, env=env)
    assert code != 0 and "1344" in out and "1376" in out, out


@pytest.fixture(scope="module")
def onnx_file(program, tmp_path_factory):
    return export_onnx(program, str(tmp_path_factory.mktemp("onnx") / "dino.onnx"))


def test_onnx_uses_grid_sample_and_matches_eager_in_onnx_runtime(onnx_file, cases, tmp_path):
    import onnx

    graph = onnx.load(onnx_file).graph
    ops = {node.op_type for node in graph.node}
    assert "GridSample" in ops and not any(node.domain.startswith("dino") for node in graph.node)
    grid_samples = [node for node in graph.node if node.op_type == "GridSample"]
    assert len(grid_samples) == 5 * 3  # one per layer and level
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in grid_samples[0].attribute}
    assert attributes == {"mode": b"bilinear", "padding_mode": b"zeros", "align_corners": 0}
    assert_fresh_run_matches(
        tmp_path,
        cases,
        """
        import sys
        import numpy as np
        import onnxruntime
        session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
        for i in range(int(sys.argv[2])):
            feed = {"images": np.load(f"images{i}.npy"), "image_sizes": np.load(f"sizes{i}.npy")}
            for k, out in enumerate(session.run(["boxes", "scores", "classes"], feed)):
                np.save(f"out{i}_{k}.npy", out)
        assert "torch" not in sys.modules
    """,
        onnx_file,
    )


def test_openvino_runs_the_onnx_export_like_eager(onnx_file, cases):
    """OpenVINO (a ``tools/benchmark.py --backends`` runtime) on the ONNX export: with the f32 hint it gives
    eager's detections; with the bf16 hint it runs and returns float32 scores in decreasing order."""
    from dino_detr.export import openvino_runtime

    for (inputs, expected), precision in itertools.product(cases, ("f32", "bf16")):
        outputs = openvino_runtime(onnx_file, precision)(*inputs)
        if precision == "f32":
            assert_same_detections(outputs, expected)
        else:
            assert outputs[1].dtype == torch.float32 and (outputs[1].diff(dim=1) <= 0).all()


def test_bf16_backend_leaves_the_model_unchanged(model, cases):
    """The "eager-bf16" backend runs a bfloat16 copy: the model itself stays float32 and unconverted."""
    (images, sizes), expected = cases[0]
    with torch.no_grad():
        boxes, scores, classes = build_runtime("eager-bf16", model, EXAMPLE_SIZE, "")(images, sizes)
    assert model.prepared_dtype is None and model.class_embed[0].weight.dtype == torch.float32
    assert scores.dtype == torch.float32 and scores.shape == expected[1].shape
    assert boxes.shape == expected[0].shape and classes.shape == expected[2].shape


def test_export_tool_writes_a_loadable_program_with_config_overrides(tmp_path):
    """tools/export_model.py with a trailing KEY VALUE override (NUM_SELECT) and an example size."""
    output = tmp_path / "tool.pt2"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "export_model.py"),
            "--config-file",
            str(REPO / "configs" / "dino_demo.yaml"),
            "--format",
            "torch-export",
            "--output",
            str(output),
            "--size",
            "320",
            "352",
            "MODEL.DINO.NUM_SELECT",
            "7",
        ],
        check=True,
        cwd=tmp_path,
        env=child_env(),
    )
    images, sizes = example_inputs(384, 320, 1)
    with torch.no_grad():
        boxes, scores, classes = torch.export.load(str(output)).module()(images, sizes)
    assert boxes.shape == (1, 7, 4) and scores.shape == (1, 7) and classes.shape == (1, 7)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    bad = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "export_model.py"),
            "--config-file",
            str(REPO / "configs" / "dino_demo.yaml"),
            "--format",
            "onnx",
            "--output",
            str(tmp_path / "x.onnx"),
            "--size",
            "300",
            "352",
        ],
        capture_output=True,
        text=True,
        env=child_env(),
    )
    assert bad.returncode != 0 and "height 300 is outside the exported sizes" in bad.stderr


def test_unknown_backend_is_refused_before_any_work(tmp_path):
    """A backend name that is not in BACKENDS fails at once with the valid names (no model copy or export)."""
    from dino_detr.export.runtimes import build_runtime

    with pytest.raises(ValueError, match="unknown backend 'tensorrt-bf16'; choose from"):
        build_runtime("tensorrt-bf16", object(), (64, 64), str(tmp_path))
