"""DETR-style dataset mapper: reads an image, sanitizes its annotations, applies DINO's
augmentation and returns the Detectron2 model input."""

import copy
import logging
import os
from typing import Dict, List, Optional

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from .image_io import read_image

__all__ = ["DinoDatasetMapper", "sanitize_annotations", "build_dino_augmentations"]

logger = logging.getLogger(__name__)


def sanitize_annotations(annotations: List[Dict], height: int, width: int, file_name: str) -> List[Dict]:
    """Clip every box to the (height, width) image and drop those that are then empty
    (zero width or height, NaN, or fully outside), with a warning naming the file.

    Args:
        annotations: Detectron2 annotation dicts with ``bbox`` and ``bbox_mode``.
    Returns:
        new annotation dicts with ``bbox`` in ``XYXY_ABS``.
    """
    kept, dropped = [], []
    for obj in annotations:
        box = np.asarray(BoxMode.convert(list(obj["bbox"]), obj["bbox_mode"], BoxMode.XYXY_ABS), dtype=np.float64)
        clipped = np.clip(box, 0, [width, height, width, height])
        if not np.all(np.isfinite(clipped)) or clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            dropped.append(list(obj["bbox"]))
            continue
        if not np.allclose(clipped, box):
            logger.warning(f"{file_name}: box {list(obj['bbox'])} leaves the {width}x{height} image; clipped")
        kept.append({**obj, "bbox": clipped.tolist(), "bbox_mode": BoxMode.XYXY_ABS})
    if dropped:
        logger.warning(f"{file_name}: dropped {len(dropped)} degenerate or out-of-image box(es): {dropped}")
    return kept


def build_dino_augmentations(cfg, is_train: bool):
    """(augmentations, augmentations_with_crop or None) of DINO.

    Training: random horizontal flip, then either the multi-scale resize of the short side
    (``INPUT.MIN_SIZE_TRAIN``, max ``INPUT.MAX_SIZE_TRAIN``) or, when
    ``INPUT.DETR_CROP.ENABLED``, resize to one of ``INPUT.DETR_CROP.RESIZE``, random crop of
    ``INPUT.DETR_CROP.SIZE`` (absolute range) and the same multi-scale resize.
    Test: ``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``.
    """
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)], None
    flip = T.RandomFlip(horizontal=True, vertical=False)
    multiscale = T.ResizeShortestEdge(
        cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
    )
    if not cfg.INPUT.DETR_CROP.ENABLED:
        return [flip, multiscale], None
    crop = [
        T.ResizeShortestEdge(cfg.INPUT.DETR_CROP.RESIZE, sample_style="choice"),
        T.RandomCrop("absolute_range", cfg.INPUT.DETR_CROP.SIZE),
    ]
    return [flip, multiscale], [flip, *crop, multiscale]


class DinoDatasetMapper:
    """Maps one Detectron2 dataset dict to ``{"image": (C, H, W) uint8 tensor, "instances",
    "height", "width", ...}``.

    Robust to the usual dataset problems: a missing image raises ``FileNotFoundError``
    naming the file; grayscale / RGBA / palette / 16-bit images are converted to 8-bit
    ``image_format``;
    boxes leaving the image are clipped and degenerate ones dropped (warning names the
    file); images without annotations give empty ``Instances``. Boxes cut by the crop are
    clipped and those left empty removed.
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: List[T.Augmentation],
        augmentations_with_crop: Optional[List[T.Augmentation]] = None,
        image_format: str = "RGB",
        crop_probability: float = 0.5,
    ):
        """
        Args:
            augmentations: used for every image (test) or with probability
                ``1 - crop_probability`` (training, when ``augmentations_with_crop`` is given).
            augmentations_with_crop: the alternative training pipeline with a random crop.
            image_format: Detectron2 image format of the model input ("RGB" or "BGR").
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.augmentations_with_crop = (
            None if augmentations_with_crop is None else T.AugmentationList(augmentations_with_crop)
        )
        self.image_format = image_format
        self.crop_probability = crop_probability
        mode = "training" if is_train else "inference"
        logger.info(f"DinoDatasetMapper ({mode}): {augmentations}, with crop: {augmentations_with_crop}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        augmentations, with_crop = build_dino_augmentations(cfg, is_train)
        return {
            "is_train": is_train,
            "augmentations": augmentations,
            "augmentations_with_crop": with_crop,
            "image_format": cfg.INPUT.FORMAT,
        }

    def read_image(self, dataset_dict: Dict) -> np.ndarray:
        """(H, W, 3) uint8 image in ``image_format``; clear error for a missing file."""
        file_name = dataset_dict["file_name"]
        if not os.path.isfile(file_name):
            raise FileNotFoundError(f"DinoDatasetMapper: image file not found: {file_name}")
        image = read_image(file_name, format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        return image

    def __call__(self, dataset_dict: Dict) -> Dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = self.read_image(dataset_dict)
        height, width = image.shape[:2]
        dataset_dict.setdefault("height", height)
        dataset_dict.setdefault("width", width)

        use_crop = self.augmentations_with_crop is not None and np.random.rand() < self.crop_probability
        aug_input = T.AugInput(image)
        transforms = (self.augmentations_with_crop if use_crop else self.augmentations)(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        annotations = dataset_dict.pop("annotations", None)
        if not self.is_train or annotations is None:
            return dataset_dict
        annotations = sanitize_annotations(
            [obj for obj in annotations if obj.get("iscrowd", 0) == 0], height, width, dataset_dict["file_name"]
        )
        for obj in annotations:
            obj.pop("segmentation", None)
            obj.pop("keypoints", None)
        annotations = [utils.transform_instance_annotations(obj, transforms, image_shape) for obj in annotations]
        instances = utils.annotations_to_instances(annotations, image_shape)
        dataset_dict["instances"] = utils.filter_empty_instances(instances)
        return dataset_dict
