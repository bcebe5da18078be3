"""Validated inputs: training targets checked by the model (class range, finite boxes of positive
size, the image named), and predictor images converted (grayscale, BGRA, uint16, float) or
refused with what was given and what is needed."""

import cv2
import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from dino_detr import get_dino_cfg
from dino_detr.engine import DinoPredictor, to_bgr_uint8

from train_utils import REPO, TINY_MODEL

TINY = [*TINY_MODEL, "MODEL.DINO.DN_NUMBER", "0", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]


@pytest.fixture(scope="module")
def cfg():
    return get_dino_cfg(REPO / "configs" / "dino_demo.yaml", TINY)  # 4 classes, denoising off


def _sample(boxes, classes, file_name=None):
    inst = Instances((64, 64))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    sample = {"image": torch.full((3, 64, 64), 128, dtype=torch.uint8), "instances": inst}
    return {**sample, "file_name": file_name} if file_name else sample


@pytest.mark.parametrize(
    "boxes, classes, message",
    [
        ([[4, 4, 30, 30]], [-1], r"image a\.png: ground-truth class -1 \(instance 0\) is outside \[0, 4\)"),
        ([[4, 4, 30, 30], [1, 1, 9, 9]], [0, 4], r"image a\.png: ground-truth class 4 \(instance 1\)"),
        ([[30, 4, 4, 30]], [1], r"image a\.png: ground-truth box \[30.0, 4.0, 4.0, 30.0\].*positive width and height"),
        ([[4, 4, float("nan"), 30]], [1], r"image a\.png: ground-truth box \[4.0, 4.0, nan, 30.0\].*must be finite"),
    ],
)
def test_training_targets_are_validated(cfg, boxes, classes, message):
    model = build_model(cfg).train()
    with pytest.raises(ValueError, match=message):
        model([_sample([[2, 2, 20, 20]], [0]), _sample(boxes, classes, "a.png")])


def test_valid_targets_train_and_bad_ones_name_the_batch_index(cfg):
    model = build_model(cfg).train()
    losses = model([_sample([[2, 2, 20, 20]], [0]), _sample([[4, 4, 60, 40], [0, 0, 64, 64]], [3, 2])])
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="image at batch index 1: ground-truth box"):
        model([_sample([[2, 2, 20, 20]], [0]), _sample([[4, 4, 4, 9]], [0])])


def test_image_conversions():
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    gray = bgr[:, :, 0]
    assert np.array_equal(to_bgr_uint8(gray), np.repeat(gray[:, :, None], 3, axis=2))
    assert np.array_equal(to_bgr_uint8(gray[:, :, None]), to_bgr_uint8(gray))
    assert np.array_equal(to_bgr_uint8(np.dstack([bgr, np.zeros_like(gray)])), bgr)  # BGRA: alpha dropped
    assert np.array_equal(to_bgr_uint8(bgr.astype(np.uint16) * 257), bgr)  # 16 bit: 65535 -> 255
    assert np.array_equal(to_bgr_uint8(bgr / 255.0), bgr)  # float in [0, 1]
    assert np.array_equal(to_bgr_uint8(bgr.astype(np.float32)), bgr)  # float in [0, 255]
    assert to_bgr_uint8(bgr) is bgr


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((0, 0, 3), np.uint8), r"empty image of shape \(0, 0, 3\)"),
        (np.full((40, 40, 3), np.nan, np.float32), "4800 NaN/Inf values"),
        (np.full((40, 40, 3), 300.0), r"values in \[300, 300\]: expected \[0, 1\] or \[0, 255\]"),
        (np.zeros((40, 40, 2), np.uint8), r"shape \(40, 40, 2\): expected \(H, W\)"),
        (np.zeros((40, 40, 3), np.int32), "dtype int32: expected uint8, uint16 or float"),
        (np.zeros((1, 5000, 3), np.uint8), r"1x5000 pixels is too small or too elongated.*becomes 0x96.*at least 32"),
    ],
)
def test_predictor_refuses_unusable_images(cfg, image, message):
    with pytest.raises(ValueError, match=message):
        DinoPredictor(cfg)(image)


def test_predictor_accepts_grayscale_and_plain_predictor_names_bad_tensors(cfg):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (48, 64), dtype=np.uint8)
    predictor = DinoPredictor(cfg)
    out = predictor(gray)["instances"]
    reference = predictor(np.repeat(gray[:, :, None], 3, axis=2))["instances"]
    assert out.image_size == (48, 64) and torch.equal(out.scores, reference.scores)
    # Detectron2's own DefaultPredictor: the model names what is wrong with the tensor it receives.
    plain = DefaultPredictor(cfg)
    plain.model.load_state_dict(predictor.model.state_dict())
    with pytest.raises(ValueError, match=r"shape \(4, 64, 64\); expected a non-empty \(3, H, W\) tensor"):
        plain(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8))
    image = np.full((64, 64, 3), 100.0, np.float32)
    image[3, 4, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf pixel values"):
        plain(image)


def test_16_bit_image_files_are_scaled_not_saturated(cfg, tmp_path):
    """tools/demo.py's reader: a 16-bit PNG is drawn as its 8-bit version (Detectron2's read_image
    saturated it to white)."""
    from visualization import visualize_predictions

    deep = (np.random.default_rng(0).random((48, 64, 3)) * 65535).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    drawn = visualize_predictions(
        DinoPredictor(cfg), [tmp_path / "deep.png"], str(tmp_path / "vis"), score_threshold=1.1
    )  # nothing drawn over the image
    # PIL reduces 16-bit RGB to 8 bit by its high byte: within one level of the exact scaling.
    difference = cv2.imread(drawn[0]).astype(int) - np.rint(deep / 257.0).astype(int)
    assert np.abs(difference).max() <= 1
