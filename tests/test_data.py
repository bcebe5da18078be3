"""Demo dataset generator and DETR-style dataset mapper."""

import logging

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.structures import BoxMode
from pycocotools.coco import COCO

from dino_detr import add_dino_config
from dino_detr.data import DemoSpec, DinoDatasetMapper, ensure_demo_dataset
from dino_detr.data.shapes import SHAPE_CLASSES

SMALL = DemoSpec(seed=3, splits={"train": 24, "val": 6}, empty_fraction=0.2)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return ensure_demo_dataset(tmp_path_factory.mktemp("demo") / "data", SMALL)


def _cfg(crop: bool = True):
    cfg = get_cfg()
    add_dino_config(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN = (96, 128)
    cfg.INPUT.MAX_SIZE_TRAIN = 200
    cfg.INPUT.MIN_SIZE_TEST = 128
    cfg.INPUT.MAX_SIZE_TEST = 200
    cfg.INPUT.DETR_CROP.ENABLED = crop
    cfg.INPUT.DETR_CROP.RESIZE = [100, 150]
    cfg.INPUT.DETR_CROP.SIZE = [40, 90]
    return cfg


def test_generator_is_deterministic_and_atomic(demo_root, tmp_path):
    again = ensure_demo_dataset(tmp_path / "again", SMALL)
    for split in SMALL.splits:
        assert (demo_root / "annotations" / f"{split}.json").read_bytes() == (
            again / "annotations" / f"{split}.json"
        ).read_bytes()
    first = cv2.imread(str(demo_root / "train" / "000005.png"))
    second = cv2.imread(str(again / "train" / "000005.png"))
    assert np.array_equal(first, second)
    # No temporary folders are left next to the dataset; a second call reuses the folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]
    mtime = (again / "meta.json").stat().st_mtime_ns
    ensure_demo_dataset(tmp_path / "again", SMALL)
    assert (again / "meta.json").stat().st_mtime_ns == mtime
    other = ensure_demo_dataset(tmp_path / "other", DemoSpec(seed=4, splits=SMALL.splits))
    assert (other / "annotations" / "train.json").read_bytes() != (again / "annotations" / "train.json").read_bytes()


def test_coco_json_valid_with_all_classes_and_empty_images(demo_root):
    coco = COCO(str(demo_root / "annotations" / "train.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == SHAPE_CLASSES
    assert {"circle", "rectangle", "triangle"} <= set(SHAPE_CLASSES)
    used = {a["category_id"] for a in coco.dataset["annotations"]}
    assert used == set(coco.getCatIds())
    empty = [i for i in coco.getImgIds() if not coco.getAnnIds(imgIds=i)]
    assert 0 < len(empty) < len(coco.getImgIds())
    for ann in coco.dataset["annotations"]:
        img = coco.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= img["width"] and y + h <= img["height"]
        assert 0 < ann["area"] <= w * h
    image = cv2.imread(str(demo_root / "train" / coco.imgs[1]["file_name"]))
    assert image.shape[:2] == (coco.imgs[1]["height"], coco.imgs[1]["width"])


def test_registered_demo_datasets():
    from detectron2.data import MetadataCatalog

    for name in ("dino_demo_train", "dino_demo_val"):
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == SHAPE_CLASSES and meta.evaluator_type == "coco"


def _record(path, height, width, boxes, mode=BoxMode.XYWH_ABS):
    return {
        "file_name": str(path),
        "height": height,
        "width": width,
        "image_id": 1,
        "annotations": [
            {"bbox": b, "bbox_mode": mode, "category_id": i % 3, "iscrowd": 0} for i, b in enumerate(boxes)
        ],
    }


def _write(path, image):
    assert cv2.imwrite(str(path), image)
    return path


@pytest.mark.parametrize("crop", [True, False])
def test_train_boxes_stay_inside_after_crop_and_flip(demo_root, crop):
    mapper = DinoDatasetMapper(_cfg(crop), is_train=True)
    from detectron2.data.datasets import load_coco_json

    records = load_coco_json(str(demo_root / "annotations" / "train.json"), str(demo_root / "train"))
    np.random.seed(0)
    sizes = set()
    for record in records[:12] * 3:
        out = mapper(record)
        c, h, w = out["image"].shape
        assert c == 3 and out["image"].dtype == torch.uint8
        sizes.add((h, w))
        boxes = out["instances"].gt_boxes.tensor
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert len(out["instances"]) <= len(record["annotations"])
    assert len(sizes) > 3  # multi-scale (and crops)


def test_flip_moves_boxes(tmp_path):
    image = np.zeros((100, 200, 3), np.uint8)
    image[20:50, 10:40] = 255
    record = _record(_write(tmp_path / "a.png", image), 100, 200, [[10, 20, 30, 30]])
    cfg = _cfg(crop=False)
    cfg.INPUT.MIN_SIZE_TRAIN = (100,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    mapper = DinoDatasetMapper(cfg, is_train=True)
    seen = set()
    for seed in range(20):
        np.random.seed(seed)
        box = mapper(record)["instances"].gt_boxes.tensor[0].tolist()
        seen.add(tuple(round(v) for v in box))
    assert seen == {(10, 20, 40, 50), (160, 20, 190, 50)}


def test_grayscale_rgba_and_tiny_images(tmp_path):
    gray = _write(tmp_path / "gray.png", np.full((40, 60), 128, np.uint8))
    rgba = _write(tmp_path / "rgba.png", np.full((50, 40, 4), 200, np.uint8))
    tiny = _write(tmp_path / "tiny.png", np.full((12, 20, 3), 50, np.uint8))
    for is_train in (True, False):
        mapper = DinoDatasetMapper(_cfg(), is_train=is_train)
        for path, (h, w) in ((gray, (40, 60)), (rgba, (50, 40)), (tiny, (12, 20))):
            out = mapper(_record(path, h, w, [[2, 2, 5, 5]]))
            assert out["image"].shape[0] == 3 and min(out["image"].shape[1:]) >= 40
            if is_train:
                assert len(out["instances"]) <= 1


def test_missing_file_names_the_file(tmp_path):
    mapper = DinoDatasetMapper(_cfg(), is_train=True)
    missing = tmp_path / "nope" / "missing_image.png"
    with pytest.raises(FileNotFoundError, match="missing_image.png"):
        mapper(_record(missing, 10, 10, []))


def test_degenerate_and_outside_boxes(tmp_path, caplog):
    path = _write(tmp_path / "boxes.png", np.zeros((100, 120, 3), np.uint8))
    boxes = [[10, 10, 30, 20], [50, 50, 0, 10], [200, 10, 20, 20], [100, 80, 50, 50], [5, 5, float("nan"), 4]]
    cfg = _cfg(crop=False)
    cfg.INPUT.MIN_SIZE_TRAIN = (100,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    mapper = DinoDatasetMapper(cfg, is_train=True)
    np.random.seed(1)  # a flip may happen: compare box sizes, not positions
    with caplog.at_level(logging.WARNING):
        out = mapper(_record(path, 100, 120, boxes))
    kept = out["instances"].gt_boxes.tensor
    assert len(kept) == 2
    sizes = sorted((round(float(b[2] - b[0])), round(float(b[3] - b[1]))) for b in kept)
    assert sizes == [(20, 20), (30, 20)]  # [100,80,50,50] clipped to 20x20
    assert "boxes.png" in caplog.text and "dropped 3" in caplog.text


def test_empty_annotations_and_test_mode(tmp_path):
    path = _write(tmp_path / "empty.png", np.zeros((64, 96, 3), np.uint8))
    out = DinoDatasetMapper(_cfg(), is_train=True)(_record(path, 64, 96, []))
    assert len(out["instances"]) == 0 and out["instances"].gt_boxes.tensor.shape == (0, 4)
    test_out = DinoDatasetMapper(_cfg(), is_train=False)(_record(path, 64, 96, [[1, 1, 5, 5]]))
    assert "instances" not in test_out and test_out["image"].shape[1:] == (128, 192)
    assert (test_out["height"], test_out["width"]) == (64, 96)


def test_image_size_mismatch_is_reported(tmp_path):
    path = _write(tmp_path / "wrong.png", np.zeros((30, 30, 3), np.uint8))
    with pytest.raises(Exception, match="wrong.png|Mismatched"):
        DinoDatasetMapper(_cfg(), is_train=True)(_record(path, 64, 96, []))


def test_coco_evaluator_scores_ground_truth_as_perfect(demo_root, tmp_path):
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, Instances

    from dino_detr.data import register_dino_demo

    if "dino_test_val" not in DatasetCatalog.list():
        register_dino_demo(demo_root, SMALL, prefix="dino_test")
    evaluator = COCOEvaluator("dino_test_val", output_dir=str(tmp_path), use_fast_impl=False)
    evaluator.reset()
    for record in DatasetCatalog.get("dino_test_val"):
        inst = Instances((record["height"], record["width"]))
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in record["annotations"]]
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.ones(len(boxes))
        inst.pred_classes = torch.tensor([a["category_id"] for a in record["annotations"]], dtype=torch.long)
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": inst}])
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(100.0)
