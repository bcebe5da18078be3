"""Conversion of published DINO checkpoints (official IDEA-Research/DINO and detrex) into this
project's Detectron2 model (see ``tools/convert_checkpoint.py``), and fine-tuning a checkpoint
to another number of classes."""
from .coco_classes import coco_category_ids, rows_91_to_80
from .convert import CLASS_LAYOUTS, SOURCES, Conversion, check_against_model, convert_state_dict
from .finetune import CLASS_DEPENDENT, drop_mismatched_class_tensors, mismatched_class_tensors
from .io import load_source_state_dict, save_detectron2_checkpoint

__all__ = [
    "CLASS_DEPENDENT", "CLASS_LAYOUTS", "SOURCES", "Conversion", "check_against_model", "coco_category_ids",
    "convert_state_dict", "drop_mismatched_class_tensors", "load_source_state_dict", "mismatched_class_tensors",
    "rows_91_to_80",
    "save_detectron2_checkpoint",
]
