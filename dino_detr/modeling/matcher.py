"""Hungarian matching of predictions to ground truth (focal class cost, L1, GIoU)."""

from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou_loss

__all__ = ["HungarianMatcher", "focal_class_cost", "assign", "generalized_box_iou", "GIOU_EPS"]

# Added to the union and to the enclosing area in GIoU, in the matching cost and in the loss, as
# in the official DINO and detrex (torchvision adds 1e-7 in its loss and nothing in its pairwise
# GIoU). It matters only for tiny boxes: a few percent of the GIoU gradient of a box under 8 px.
GIOU_EPS = 1e-6


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = GIOU_EPS) -> torch.Tensor:
    """Pairwise generalized IoU, ``eps`` added to the union and the enclosing area.

    Args:
        boxes1: (N, 4), boxes2: (M, 4), absolute or normalized xyxy.
    Returns:
        (N, M)
    """
    n, m = len(boxes1), len(boxes2)
    # torchvision's GIoU loss takes eps and works elementwise on broadcast pairs.
    return 1 - generalized_box_iou_loss(boxes1[:, None].expand(n, m, 4), boxes2[None].expand(n, m, 4), eps=eps)


def focal_class_cost(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0):
    """Classification cost of Deformable DETR / DINO: the focal loss of predicting the
    target class as positive minus that of predicting it as negative.

    Args:
        logits: (Q, num_classes); labels: (M,) int64.
    Returns:
        (Q, M)
    """
    prob = logits.sigmoid()
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
    return pos[:, labels] - neg[:, labels]


def assign(cost: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost one-to-one assignment of a (Q, M) cost matrix (scipy's
    ``linear_sum_assignment``). Returns (query indices, target indices), int64, sorted by query."""
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


class HungarianMatcher(nn.Module):
    """Matches the predictions of each image one-to-one to its ground truth by minimizing
    ``cost_class * focal + cost_bbox * L1 + cost_giou * (-GIoU)``; the costs of the whole
    batch are computed at once, then assigned per image."""

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        giou_eps: float = GIOU_EPS,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_bbox and cost_giou are all 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.giou_eps = giou_eps

    @torch.no_grad()
    def cost_matrix(self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]) -> torch.Tensor:
        """Matching costs of every query against every target box of the batch.

        Args: as in :meth:`forward`.
        Returns:
            (N, Q, sum of M_b), float32 on the CPU.
        """
        n, q = outputs["pred_logits"].shape[:2]
        logits = outputs["pred_logits"].flatten(0, 1)
        boxes = outputs["pred_boxes"].flatten(0, 1)
        labels = torch.cat([t["labels"] for t in targets])
        gt_boxes = torch.cat([t["boxes"] for t in targets])
        giou = generalized_box_iou(
            box_convert(boxes, "cxcywh", "xyxy"), box_convert(gt_boxes, "cxcywh", "xyxy"), self.giou_eps
        )
        cost = (
            self.cost_class * focal_class_cost(logits, labels, self.focal_alpha, self.focal_gamma)
            + self.cost_bbox * torch.cdist(boxes, gt_boxes, p=1)
            - self.cost_giou * giou
        )
        return cost.view(n, q, -1).float().cpu()

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]):
        """
        Args:
            outputs: ``pred_logits`` (N, Q, num_classes), ``pred_boxes`` (N, Q, 4) normalized cxcywh.
            targets: per image ``labels`` (M_b,) and ``boxes`` (M_b, 4) normalized cxcywh.
        Returns:
            per image (query indices, target indices), each of length min(Q, M_b).
        """
        cost = self.cost_matrix(outputs, targets)
        if not torch.isfinite(cost).all():
            raise FloatingPointError(
                "HungarianMatcher: non-finite (NaN/Inf) matching costs, i.e. the predictions diverged. "
                "Lower SOLVER.BASE_LR, keep SOLVER.CLIP_GRADIENTS enabled, or check the data."
            )
        sizes = [len(t["boxes"]) for t in targets]
        return [assign(c[b]) for b, c in enumerate(cost.split(sizes, -1))]
