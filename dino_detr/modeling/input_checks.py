"""Checks of the batched inputs a ``DinoDetr`` gets: a bad image or ground-truth instance is refused with an
error that names it (``file_name`` or batch index), before it can become a wrong loss or a crash."""

import logging
import math
from typing import Dict, List

import torch

__all__ = ["check_images", "check_training_targets"]

logger = logging.getLogger(__name__)


def _name(batched_inputs: List[Dict], i: int) -> str:
    return batched_inputs[i].get("file_name", f"at batch index {i}")


def check_images(batched_inputs: List[Dict], channels: int) -> None:
    """``ValueError`` naming the image when its ``image`` is not a non-empty (channels, H, W)
    tensor of finite values; a warning when a float image lies in [0, 1] (the model expects
    0-255 pixel values)."""
    for i, x in enumerate(batched_inputs):
        image = x["image"]
        if image.dim() != 3 or image.shape[0] != channels or image.numel() == 0:
            raise ValueError(
                f"DinoDetr: image {_name(batched_inputs, i)} has shape {tuple(image.shape)}; expected a "
                f"non-empty ({channels}, H, W) tensor in the model's INPUT.FORMAT"
            )
        if image.is_floating_point():
            low, high = torch.stack(torch.aminmax(image.detach())).tolist()  # NaN propagates; one pass
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError(f"DinoDetr: image {_name(batched_inputs, i)} has NaN or Inf pixel values")
            if 0 <= low and 0 < high <= 1:
                logger.warning(
                    f"DinoDetr: image {_name(batched_inputs, i)} has values in [0, 1]; the model expects "
                    "0-255 pixel values (DinoPredictor scales [0, 1] float images)"
                )


def check_training_targets(batched_inputs: List[Dict], num_classes: int) -> None:
    """``ValueError`` naming the image (``file_name`` or batch index) and the value when a
    ground-truth class is outside [0, num_classes) or a box (XYXY) is not finite with
    positive width and height. One device synchronisation when everything is valid."""

    def bad_classes(inst):
        return (inst.gt_classes < 0) | (inst.gt_classes >= num_classes)

    def bad_boxes(inst):
        b = inst.gt_boxes.tensor
        return ~torch.isfinite(b).all(1) | (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])

    instances = [x["instances"] for x in batched_inputs]
    if not torch.stack([bad_classes(t).any() | bad_boxes(t).any() for t in instances]).any():
        return
    for i, inst in enumerate(instances):
        classes, boxes = bad_classes(inst).nonzero().flatten(), bad_boxes(inst).nonzero().flatten()
        if len(classes):
            j = int(classes[0])
            raise ValueError(
                f"DinoDetr: image {_name(batched_inputs, i)}: ground-truth class "
                f"{int(inst.gt_classes[j])} (instance {j}) is outside [0, {num_classes}) "
                "(MODEL.DINO.NUM_CLASSES)"
            )
        if len(boxes):
            j = int(boxes[0])
            raise ValueError(
                f"DinoDetr: image {_name(batched_inputs, i)}: ground-truth box "
                f"{inst.gt_boxes.tensor[j].tolist()} (instance {j}, XYXY) must be finite with positive "
                "width and height"
            )
