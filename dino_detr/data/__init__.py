"""Data pieces of the DINO project: COCO-format datasets from the config (checked once before
use), the image reader, the DETR-style dataset mapper and the embedded demo dataset
(registered here as ``dino_demo_train`` / ``dino_demo_val``)."""

from detectron2.data import DatasetCatalog

from .coco import (
    DatasetError,
    check_coco_dataset,
    check_num_classes,
    load_checked_coco_json,
    parse_dataset_option,
    register_coco_dataset,
    register_config_datasets,
)
from .dataset_mapper import DinoDatasetMapper, sanitize_annotations
from .demo_dataset import DEFAULT_SPEC, DemoSpec, default_demo_root, ensure_demo_dataset, register_dino_demo
from .image_io import read_image

__all__ = [
    "DatasetError",
    "check_coco_dataset",
    "check_num_classes",
    "load_checked_coco_json",
    "parse_dataset_option",
    "register_coco_dataset",
    "register_config_datasets",
    "read_image",
    "DinoDatasetMapper",
    "sanitize_annotations",
    "DemoSpec",
    "DEFAULT_SPEC",
    "default_demo_root",
    "ensure_demo_dataset",
    "register_dino_demo",
]

if "dino_demo_train" not in DatasetCatalog.list():
    register_dino_demo()
