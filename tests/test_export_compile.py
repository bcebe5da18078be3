"""torch.compile for inference (``MODEL.DINO.COMPILE``): the network from the padded images to
the predictions is one graph (no break in the backbone, encoder or decoder), compiled once for
all image sizes, and gives the eager detections."""

from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model

from dino_detr import get_dino_cfg
from dino_detr.export import example_inputs
from dino_detr.layers import native_extension_available
from dino_detr.modeling.meta_arch import image_padding_mask

pytestmark = pytest.mark.skipif(not native_extension_available(), reason="dino_detr._C is not built")

GRAPHS = []


@torch._dynamo.register_backend(name="dino_test_graph_counter")
def graph_counter(graph_module, example_inputs):
    """Eager backend that records each graph it is given (one per compilation)."""
    GRAPHS.append(graph_module)
    return graph_module.forward


def build(compile_backend=""):
    cfg = get_dino_cfg(
        Path(__file__).resolve().parents[1] / "configs" / "dino_demo.yaml",
        ["MODEL.DEVICE", "cpu", "MODEL.DINO.COMPILE", compile_backend],
    )
    torch.manual_seed(0)
    return build_model(cfg).eval()


def test_network_is_one_graph_without_breaks():
    model = build()
    images, sizes = example_inputs(320, 352)
    with torch.no_grad():
        explanation = torch._dynamo.explain(model.predict_padded)(images, image_padding_mask(sizes, 320, 352))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    ops = [str(n.target) for g in explanation.graphs for n in g.graph.nodes]
    assert ops.count("dino_detr.ms_deform_attn") + ops.count("dino_detr.ms_deform_attn.default") == 5


def test_compiled_inference_is_eager_inference_for_every_size_with_one_compilation():
    eager, compiled = build(), build("dino_test_graph_counter")
    torch._dynamo.reset()
    GRAPHS.clear()
    generator = torch.Generator().manual_seed(0)
    for h, w in [(300, 330), (256, 410), (352, 352)]:
        inputs = [{"image": torch.randint(0, 256, (3, h, w), generator=generator).float()}]
        with torch.no_grad():
            expected, got = eager(inputs)[0]["instances"], compiled(inputs)[0]["instances"]
        torch.testing.assert_close(got.scores, expected.scores, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.pred_boxes.tensor, expected.pred_boxes.tensor, rtol=0, atol=1e-4)
        assert torch.equal(got.pred_classes, expected.pred_classes)
    assert len(GRAPHS) == 1


def test_unknown_compile_backend_names_the_key():
    with pytest.raises(ValueError, match=r"MODEL\.DINO\.COMPILE='inductr' is not a torch.compile backend"):
        build("inductr")
