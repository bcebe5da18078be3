"""The inference path of :class:`DinoDetr` as a module of tensors only, for export."""

from typing import Tuple

import torch
from torch import nn

from dino_detr.modeling.meta_arch import DinoDetr, image_padding_mask, top_detections

__all__ = ["DetectorForExport"]


class DetectorForExport(nn.Module):
    """``(images, image_sizes) -> (boxes, scores, classes)`` of a :class:`DinoDetr` in eval mode.

    The caller does Detectron2's preprocessing (resize, channel order ``INPUT.FORMAT``,
    ``(x - PIXEL_MEAN) / PIXEL_STD``, zero padding of the batch to a multiple of 32, see
    :func:`dino_detr.export.preprocess`) and rescales the boxes to the original image
    (multiply x by ``original_w / w`` and y by ``original_h / h``).

    Args:
        model: a built ``DinoDetr``; its weights are shared, not copied.
    """

    def __init__(self, model: DinoDetr):
        super().__init__()
        if not isinstance(model, DinoDetr):
            raise TypeError(f"DetectorForExport: expected a DinoDetr model, got {type(model).__name__}")
        self.model = model.eval()

    def forward(
        self, images: torch.Tensor, image_sizes: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            images: (N, 3, H, W) float32 normalized images, zero-padded after normalization.
            image_sizes: (N, 2) int64 valid (h, w) of each image inside the padded batch.
        Returns:
            boxes (N, NUM_SELECT, 4) float32 xyxy in the pixels of ``images``; scores
            (N, NUM_SELECT) in decreasing order; classes (N, NUM_SELECT) int64.
        """
        mask = image_padding_mask(image_sizes, images.shape[-2], images.shape[-1])
        last = self.model.predict_padded(images, mask)["layers"][-1]
        return top_detections(last["pred_logits"], last["pred_boxes"], image_sizes, self.model.num_select)
