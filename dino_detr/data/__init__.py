"""Data pieces of the DINO project: the DETR-style dataset mapper and the embedded demo
dataset (registered here as ``dino_demo_train`` / ``dino_demo_val``)."""
from detectron2.data import DatasetCatalog

from .dataset_mapper import DinoDatasetMapper, sanitize_annotations
from .demo_dataset import DEFAULT_SPEC, DemoSpec, default_demo_root, ensure_demo_dataset, register_dino_demo

__all__ = [
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
