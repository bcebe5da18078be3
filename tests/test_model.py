"""The DINO meta-architecture: configs, parameter fidelity, outputs, losses, and that it learns."""

import glob
import itertools
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage

from dino_detr import get_dino_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "dino_r*.yaml")))


def load_cfg(path=os.path.join(REPO, "configs", "dino_r50_4scale.yaml"), opts=()):
    cfg = get_dino_cfg(path, opts)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


TINY = [
    "MODEL.RESNETS.DEPTH",
    18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    64,
    "MODEL.RESNETS.NORM",
    "GN",
    "MODEL.BACKBONE.FREEZE_AT",
    0,
    "MODEL.DINO.HIDDEN_DIM",
    64,
    "MODEL.DINO.NHEADS",
    4,
    "MODEL.DINO.ENC_LAYERS",
    2,
    "MODEL.DINO.DEC_LAYERS",
    3,
    "MODEL.DINO.DIM_FEEDFORWARD",
    128,
    "MODEL.DINO.NUM_QUERIES",
    30,
    "MODEL.DINO.NUM_SELECT",
    20,
    "MODEL.DINO.NUM_CLASSES",
    3,
    "MODEL.DINO.DN_NUMBER",
    10,
]


def tiny_model(*opts):
    torch.manual_seed(0)
    return build_model(load_cfg(opts=TINY + list(opts)))


def make_input(h, w, boxes, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return {"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g), "instances": inst}


def shapes_image(h, w, boxes):
    """An image with a flat coloured rectangle per box on a dark background (learnable)."""
    image = torch.full((3, h, w), 30, dtype=torch.uint8)
    colours = [(250, 60, 60), (60, 250, 60), (60, 60, 250)]
    for (x0, y0, x1, y1), c in zip(boxes, itertools.cycle(colours)):
        image[:, int(y0) : int(y1), int(x0) : int(x1)] = torch.tensor(c, dtype=torch.uint8)[:, None, None]
    return image


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_files_build(path):
    with torch.device("meta"):
        cfg = load_cfg(path)
        cfg.MODEL.DEVICE = "meta"
        model = build_model(cfg)
    assert type(model).__name__ == "DinoDetr"
    assert model.input_proj[0][0].in_channels == model.backbone.output_shape()[cfg.MODEL.DINO.IN_FEATURES[0]].channels
    assert len(model.input_proj) == cfg.MODEL.DINO.NUM_FEATURE_LEVELS


def test_parameter_count_matches_official():
    """Official DINO-4scale R50 with the 91-id COCO layout: 46,893,182 parameters, backbone 23,454,912."""
    with torch.device("meta"):
        cfg = load_cfg(opts=["MODEL.DINO.NUM_CLASSES", 91])
        cfg.MODEL.DEVICE = "meta"
        model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == 46_893_182
    assert sum(p.numel() for p in model.backbone.parameters()) == 23_454_912
    # Shared heads: one set of class/box head parameters for all decoder layers (as official).
    assert model.transformer.decoder.bbox_embed is model.bbox_embed
    assert all(h is model.class_embed[0] for h in model.class_embed)
    assert model.label_enc.weight.shape == (92, 256)


@pytest.mark.parametrize(
    "opts, key",
    [
        (["MODEL.DINO.NO_SUCH_KEY", 1], "MODEL.DINO.NO_SUCH_KEY"),
        (["MODEL.DINO.HIDDEN_DIM", 250], "MODEL.DINO.HIDDEN_DIM"),
        (["MODEL.DINO.NUM_FEATURE_LEVELS", 2], "MODEL.DINO.NUM_FEATURE_LEVELS"),
        (["MODEL.DINO.DN_LABELBOOK_SIZE", 10], "MODEL.DINO.DN_LABELBOOK_SIZE"),
        (["MODEL.DINO.POSITION_EMBEDDING", "cosine"], "MODEL.DINO.POSITION_EMBEDDING"),
        (["MODEL.DINO.IN_FEATURES", ["res3", "res6"]], "MODEL.DINO.IN_FEATURES"),
        (["MODEL.DINO.NUM_SELECT", 10**6], "MODEL.DINO.NUM_SELECT"),
        (["MODEL.DINO.ENCODER_CPU_CHUNK_SIZE", -1], "MODEL.DINO.ENCODER_CPU_CHUNK_SIZE"),
        (
            ["MODEL.DINO.COST_CLASS", 0.0, "MODEL.DINO.COST_BBOX", 0.0, "MODEL.DINO.COST_GIOU", 0.0],
            "MODEL.DINO.COST_CLASS",
        ),
    ],
)
def test_bad_config_names_the_key(opts, key):
    with pytest.raises((AssertionError, KeyError, ValueError), match=key.replace(".", r"\.")):
        build_model(load_cfg(opts=opts))


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return build_model(load_cfg())


def test_r50_4scale_eval_at_800x1333(r50):
    r50.eval()
    image = torch.randint(0, 256, (3, 800, 1333), dtype=torch.uint8)
    with torch.no_grad():
        (out,) = r50([{"image": image, "height": 400, "width": 666}])
    inst = out["instances"]
    assert inst.image_size == (400, 666)
    assert set(inst.get_fields()) == {"pred_boxes", "scores", "pred_classes"}
    assert 0 < len(inst) <= 300
    boxes = inst.pred_boxes.tensor
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= 666).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= 400).all()
    assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
    assert inst.pred_classes.dtype == torch.int64 and (inst.pred_classes < 80).all()
    assert torch.all(inst.scores[:-1] >= inst.scores[1:])


def test_r50_4scale_train_at_800x1333(r50):
    r50.train()
    batch = [make_input(800, 1333, [[10, 20, 400, 500], [600, 100, 1300, 790]], [3, 79])]
    with EventStorage():
        losses = r50(batch)
    suffixes = [f"_{i}" for i in range(5)] + ["", "_enc", "_dn"] + [f"_dn_{i}" for i in range(5)]
    assert set(losses) == {f"loss_{k}{s}" for k in ("class", "bbox", "giou") for s in suffixes}
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    sum(losses.values()).backward()
    assert r50.label_enc.weight.grad.abs().sum() > 0  # denoising reaches the label embedding
    assert r50.transformer.tgt_embed.weight.grad.abs().sum() > 0  # learned content queries


def test_batch_mixing_images_with_and_without_boxes():
    model = tiny_model()
    model.train()
    batch = [make_input(96, 128, [[5, 5, 60, 50]], [1], seed=1), make_input(80, 100, [], [], seed=2)]
    with EventStorage():
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox_dn"] > 0
    with EventStorage():
        empty = model([make_input(80, 100, [], [], seed=3)])
    assert set(empty) == set(losses)
    assert empty["loss_bbox"] == 0 and empty["loss_class"] > 0  # every query is "no object"
    sum(empty.values()).backward()  # the denoising placeholder keeps the graph connected


def test_eval_rescales_to_requested_size():
    model = tiny_model().eval()
    with torch.no_grad():
        out = model(
            [
                {"image": torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8), "height": 128, "width": 192},
                {"image": torch.randint(0, 256, (3, 80, 60), dtype=torch.uint8)},
            ]
        )
    assert out[0]["instances"].image_size == (128, 192)
    assert out[1]["instances"].image_size == (80, 60)
    assert len(out[0]["instances"]) <= 20


def test_overfits_two_images():
    """A few dozen AdamW steps on two fixed images: the loss falls sharply and the top
    predictions land on the ground truth. Fails if matching, losses or box refinement break."""
    model = tiny_model("MODEL.DINO.DN_NUMBER", 4)
    boxes = [[[8, 10, 50, 40], [60, 50, 120, 90]], [[20, 20, 100, 80]]]
    classes = [[0, 2], [1]]
    batch = []
    for b, c in zip(boxes, classes):
        item = make_input(96, 128, b, c)
        item["image"] = shapes_image(96, 128, b)
        batch.append(item)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    model.train()
    history = []
    with EventStorage():
        for _ in range(60):
            loss = sum(model(batch).values())
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()
            history.append(loss.item())
    assert sum(history[-5:]) / 5 < 0.5 * sum(history[:5]) / 5, history
    model.eval()
    with torch.no_grad():
        outputs = model([{"image": x["image"]} for x in batch])
    for out, gt_boxes, gt_classes in zip(outputs, boxes, classes):
        inst = out["instances"]
        for box, cls in zip(gt_boxes, gt_classes):
            same_class = inst[inst.pred_classes == cls]
            top = same_class[same_class.scores.argsort(descending=True)[:3]]
            iou = pairwise_iou(Boxes(torch.tensor([box], dtype=torch.float32)), top.pred_boxes)
            assert iou.max() > 0.5, (box, cls, top)


def test_timm_backbone_builds_and_runs():
    pytest.importorskip("timm")
    model = tiny_model(
        "MODEL.BACKBONE.NAME",
        "build_timm_backbone",
        "MODEL.TIMM.NAME",
        "tf_mobilenetv3_small_075",
        "MODEL.TIMM.OUT_INDICES",
        [1, 2, 3],
        "MODEL.DINO.IN_FEATURES",
        ["timm_feat1", "timm_feat2", "timm_feat3"],
    )
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": torch.randint(0, 256, (3, 128, 160), dtype=torch.uint8)}])
    assert len(out["instances"]) == 20
    assert [model.backbone.output_shape()[f"timm_feat{i}"].stride for i in (1, 2, 3)] == [4, 8, 16]
