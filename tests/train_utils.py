"""Shared setup of the training tests: a tiny demo dataset and a reduced demo config."""

import os
from pathlib import Path

from detectron2.data import DatasetCatalog

from dino_detr import get_dino_cfg
from dino_detr.data import DemoSpec, ensure_demo_dataset, register_dino_demo

REPO = Path(__file__).resolve().parents[1]
# Overrides of configs/dino_demo.yaml for a model that builds and runs in well under a second.
TINY_MODEL = [
    "MODEL.DEVICE", "cpu",
    "MODEL.DINO.HIDDEN_DIM", "64",
    "MODEL.DINO.DIM_FEEDFORWARD", "64",
    "MODEL.DINO.ENC_LAYERS", "1",
    "MODEL.DINO.DEC_LAYERS", "2",
    "MODEL.DINO.NUM_QUERIES", "20",
    "MODEL.DINO.NUM_SELECT", "20",
]  # fmt: skip
# 16 small images with 1-3 large shapes: a set a working DINO fits in a few hundred steps.
CI_SPEC = DemoSpec(
    seed=7,
    splits={"train": 16},
    min_side=128,
    max_side=160,
    max_objects=3,
    empty_fraction=0.1,
    min_object_size=32.0,
    max_object_size=72.0,
)


def ci_dataset(root: os.PathLike) -> str:
    """Generates (once) and registers the CI dataset; returns its dataset name."""
    root = ensure_demo_dataset(Path(root), CI_SPEC)
    if "dino_ci_train" not in DatasetCatalog.list():
        register_dino_demo(root, CI_SPEC, prefix="dino_ci")
    return "dino_ci_train"


def ci_cfg(output_dir, max_iter: int, **overrides):
    """configs/dino_demo.yaml reduced for CI: 128 px inputs, fewer queries, a BatchNorm R18 to res5, CPU, seeded."""
    cfg = get_dino_cfg(REPO / "configs" / "dino_demo.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN = ("dino_ci_train",)
    cfg.DATASETS.TEST = ("dino_ci_train",)
    cfg.INPUT.MIN_SIZE_TRAIN = (128,)
    cfg.INPUT.MAX_SIZE_TRAIN = 200
    cfg.INPUT.MIN_SIZE_TEST = 128
    cfg.INPUT.MAX_SIZE_TEST = 200
    cfg.MODEL.DINO.NUM_QUERIES = 30
    cfg.MODEL.DINO.NUM_SELECT = 30
    cfg.MODEL.DINO.DN_NUMBER = 10
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
    # The CI model keeps the backbone its bars were measured with (R18 to res5, BatchNorm, which bfloat16
    # inference folds into the convolutions), not the demo's GroupNorm R18 to res4: trained for 200 steps on
    # 16 images the latter scores its detections near ties, which bfloat16 reorders.
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.DINO.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.STEPS = (int(max_iter * 0.85),)
    cfg.SOLVER.WARMUP_ITERS = min(20, max_iter // 4)
    cfg.SOLVER.CHECKPOINT_PERIOD = 10**6
    cfg.TEST.EVAL_PERIOD = 0
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SEED = 0
    cfg.OUTPUT_DIR = str(output_dir)
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return cfg


def unmatched_detections(reference, other, top: int, min_iou: float, score_tol: float) -> list:
    """The best ``top`` detections of ``reference`` (Detectron2 ``Instances``, sorted by score) that
    ``other`` does not find again: no detection of the same class with box IoU >= ``min_iou`` and a score
    within ``score_tol``. Returned as (score, class, best IoU) for the error message."""
    from detectron2.structures import pairwise_iou

    missing = []
    for i in range(min(top, len(reference))):
        same = other[
            (other.pred_classes == reference.pred_classes[i])
            & ((other.scores - reference.scores[i]).abs() <= score_tol)
        ]
        best = float(pairwise_iou(reference.pred_boxes[i : i + 1], same.pred_boxes).max()) if len(same) else 0.0
        if best < min_iou:
            missing.append((float(reference.scores[i]), int(reference.pred_classes[i]), best))
    return missing
