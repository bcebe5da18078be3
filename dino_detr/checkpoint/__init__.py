"""Checkpoints: loading weight files without running code from them (``SafeCheckpointer``,
used by the trainer, the tools and, once ``dino_detr`` is imported, Detectron2's
``DefaultPredictor`` / ``DefaultTrainer``), the fit rule, fine-tuning to another number of
classes, crash-safe writing, conversion of official / detrex / mmdetection checkpoints (also on load),
and published weights by name (``dino_detr://<source>/<name>``) with verified downloads."""

from .checkpointer import SafeCheckpointer, use_safe_checkpointer
from .coco_classes import coco_category_ids, rows_91_to_80
from .convert import CLASS_LAYOUTS, SOURCES, Conversion, check_against_model, convert_state_dict
from .download import ChecksumError, WeightsDownloadError
from .finetune import drop_mismatched_class_tensors, mismatched_class_tensors
from .fit import CLASS_DEPENDENT_KEY_PATTERNS, check_checkpoint_fits, is_class_dependent
from .io import atomic_open, load_source_state_dict, save_detectron2_checkpoint
from .layouts import LAYOUTS, as_project_checkpoint, layout_of, mmdet_source_config
from .safe_load import TRUSTED_WEIGHTS_ENV, UnreadableCheckpointError, UnsafeCheckpointError
from .zoo import MIRROR_ENV, PUBLISHED_WEIGHTS, PublishedWeights, published_weights, register_weight_handlers

register_weight_handlers()

__all__ = [
    "CLASS_DEPENDENT_KEY_PATTERNS",
    "CLASS_LAYOUTS",
    "LAYOUTS",
    "MIRROR_ENV",
    "PUBLISHED_WEIGHTS",
    "SOURCES",
    "TRUSTED_WEIGHTS_ENV",
    "ChecksumError",
    "Conversion",
    "PublishedWeights",
    "SafeCheckpointer",
    "UnreadableCheckpointError",
    "UnsafeCheckpointError",
    "WeightsDownloadError",
    "as_project_checkpoint",
    "atomic_open",
    "check_against_model",
    "check_checkpoint_fits",
    "coco_category_ids",
    "convert_state_dict",
    "drop_mismatched_class_tensors",
    "is_class_dependent",
    "layout_of",
    "load_source_state_dict",
    "mismatched_class_tensors",
    "mmdet_source_config",
    "published_weights",
    "register_weight_handlers",
    "rows_91_to_80",
    "save_detectron2_checkpoint",
    "use_safe_checkpointer",
]
