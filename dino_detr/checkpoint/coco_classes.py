"""COCO class layouts: the official DINO release indexes its classifier rows by the 91 COCO
category ids (row ``i`` = category id ``i``; ids 0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are
unused), Detectron2 by the 80 contiguous ids of ``coco_2017_*`` (its metadata)."""

from typing import List

import torch
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

__all__ = ["COCO_NUM_IDS", "coco_category_ids", "rows_91_to_80"]

#: Rows of the official classifier: category ids 0..90.
COCO_NUM_IDS = 91


def coco_category_ids() -> List[int]:
    """The COCO category id of each Detectron2 contiguous class 0..79 (ascending ids, as
    Detectron2's ``thing_dataset_id_to_contiguous_id``)."""
    return sorted(c["id"] for c in COCO_CATEGORIES if c["isthing"])


def rows_91_to_80(key: str, tensor: torch.Tensor, extra_rows: int = 0) -> torch.Tensor:
    """Keep the rows of the 80 COCO categories, in Detectron2's contiguous order.

    Args:
        key: checkpoint name of ``tensor`` (for the error message).
        tensor: (91 + extra_rows, ...) rows indexed by COCO category id, then ``extra_rows``
            rows that are not classes (e.g. the spare row of the denoising label embedding).
        extra_rows: trailing rows kept as they are.
    Returns:
        (80 + extra_rows, ...): row ``c`` = input row ``coco_category_ids()[c]``.
    """
    if tensor.dim() == 0 or tensor.shape[0] != COCO_NUM_IDS + extra_rows:
        raise ValueError(
            f"{key}: expected {COCO_NUM_IDS + extra_rows} rows (the 91 COCO category ids"
            f"{f' + {extra_rows} extra' if extra_rows else ''}) to remap to 80 classes, got shape {tuple(tensor.shape)}"
        )
    index = torch.tensor(coco_category_ids() + list(range(COCO_NUM_IDS, COCO_NUM_IDS + extra_rows)))
    return tensor.index_select(0, index).clone()
