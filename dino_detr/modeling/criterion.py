"""The DINO training loss: sigmoid focal classification, L1 and GIoU box losses on the
matched queries of every decoder layer, the encoder proposals and the denoising queries."""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.utils import comm
from torch import nn
from torch.nn import functional as F
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from .matcher import GIOU_EPS

__all__ = ["SetCriterion", "average_num_boxes", "layer_suffixes"]

Indices = List[Tuple[torch.Tensor, torch.Tensor]]


def average_num_boxes(targets: List[Dict[str, torch.Tensor]], device) -> float:
    """Number of target boxes per worker, averaged over all workers, at least 1 (the loss
    normalizer of DETR)."""
    num = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if comm.get_world_size() > 1:
        torch.distributed.all_reduce(num)
    return torch.clamp(num / comm.get_world_size(), min=1).item()


def layer_suffixes(num_layers: int, prefix: str = "") -> List[str]:
    """Loss-key suffixes of the decoder layers: ``{prefix}_{i}`` for the auxiliary layers,
    ``{prefix}`` for the last one."""
    return [f"{prefix}_{i}" for i in range(num_layers - 1)] + [prefix]


def _permutation_idx(indices: Indices, device):
    """(batch index, query index) of all matched queries, on ``device``."""
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src = torch.cat([src for src, _ in indices])
    return batch.to(device), src.to(device)


class SetCriterion(nn.Module):
    """Loss of one set of predictions given an assignment, and the sum over DINO's sets.

    Loss keys: ``loss_class``, ``loss_bbox``, ``loss_giou`` with suffixes ``""`` (last decoder
    layer), ``_{i}`` (decoder layer i < D-1), ``_enc`` (encoder proposals), ``_dn`` and
    ``_dn_{i}`` (denoising queries). Every value is already multiplied by its weight.

    Args:
        matcher: HungarianMatcher.
        weight_dict: weights of ``loss_class``, ``loss_bbox``, ``loss_giou``.
        giou_eps: added to the union and the enclosing area in the GIoU loss (see ``GIOU_EPS``).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        giou_eps: float = GIOU_EPS,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.giou_eps = giou_eps

    def loss_labels(self, logits: torch.Tensor, targets, indices: Indices, num_boxes: float) -> torch.Tensor:
        """Sigmoid focal loss over all queries and classes; unmatched queries are "no object"
        (all-zero target). logits: (N, Q, num_classes)."""
        target = torch.zeros_like(logits)
        batch, src = _permutation_idx(indices, logits.device)
        classes = torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)])
        target[batch, src, classes] = 1.0
        loss = sigmoid_focal_loss(logits, target, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum")
        return loss / num_boxes

    def loss_boxes(self, boxes: torch.Tensor, targets, indices: Indices, num_boxes: float):
        """L1 and GIoU losses of the matched boxes. boxes: (N, Q, 4) normalized cxcywh."""
        batch, src = _permutation_idx(indices, boxes.device)
        pred = boxes[batch, src]
        gt = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)], dim=0)
        loss_bbox = F.l1_loss(pred, gt, reduction="sum") / num_boxes
        loss_giou = (
            generalized_box_iou_loss(
                box_convert(pred, "cxcywh", "xyxy"),
                box_convert(gt, "cxcywh", "xyxy"),
                reduction="sum",
                eps=self.giou_eps,
            )
            / num_boxes
        )
        return loss_bbox, loss_giou

    def set_loss(
        self, outputs: Dict[str, torch.Tensor], targets, indices: Indices, num_boxes: float, suffix: str
    ) -> Dict[str, torch.Tensor]:
        """Weighted losses of one prediction set ``{pred_logits, pred_boxes}``."""
        loss_bbox, loss_giou = self.loss_boxes(outputs["pred_boxes"], targets, indices, num_boxes)
        losses = {
            "loss_class": self.loss_labels(outputs["pred_logits"], targets, indices, num_boxes),
            "loss_bbox": loss_bbox,
            "loss_giou": loss_giou,
        }
        return {k + suffix: v * self.weight_dict[k] for k, v in losses.items()}

    def forward(
        self,
        decoder_outputs: Sequence[Dict[str, torch.Tensor]],
        targets: List[Dict[str, torch.Tensor]],
        enc_outputs: Optional[Dict[str, torch.Tensor]] = None,
        dn_outputs: Optional[Sequence[Dict[str, torch.Tensor]]] = None,
        dn_indices: Optional[Indices] = None,
        dn_num_groups: int = 1,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            decoder_outputs: per decoder layer ``{pred_logits (N, K, C), pred_boxes (N, K, 4)}``,
                last layer last; all but the last are auxiliary (empty list entries skipped).
            targets: per image ``labels`` (M_b,) and ``boxes`` (M_b, 4) normalized cxcywh.
            enc_outputs: encoder predictions of the selected proposals, or None.
            dn_outputs: per decoder layer predictions of the denoising queries, or None.
            dn_indices: fixed (query, gt) pairs of the positive denoising queries.
            dn_num_groups: denoising groups (the dn loss is normalized by num_boxes * groups).
        """
        num_boxes = average_num_boxes(targets, decoder_outputs[-1]["pred_logits"].device)
        losses = {}
        for out, suffix in zip(decoder_outputs, layer_suffixes(len(decoder_outputs))):
            losses.update(self.set_loss(out, targets, self.matcher(out, targets), num_boxes, suffix))
        if enc_outputs is not None:
            losses.update(self.set_loss(enc_outputs, targets, self.matcher(enc_outputs, targets), num_boxes, "_enc"))
        if dn_outputs is not None:
            for out, suffix in zip(dn_outputs, layer_suffixes(len(dn_outputs), "_dn")):
                losses.update(self.set_loss(out, targets, dn_indices, num_boxes * dn_num_groups, suffix))
        return losses

    def dn_placeholder(self, num_layers: int, zero: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The denoising loss keys, all set to ``zero``, for batches without denoising queries
        (no box in the batch): keeps the loss dict identical across workers and iterations."""
        return {k + s: zero for s in layer_suffixes(num_layers, "_dn") for k in self.weight_dict}
