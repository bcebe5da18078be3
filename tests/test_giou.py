"""GIoU as the official DINO computes it: 1e-6 added to the union and to the enclosing area, in the
loss and in the matching cost. Checked in float64 against the formula written out, on tiny boxes
where the epsilon matters, with torchvision's defaults as the mutant that must be told apart."""

import torch
from torchvision.ops import box_convert, generalized_box_iou_loss
from torchvision.ops import generalized_box_iou as torchvision_pairwise_giou

from dino_detr.modeling.criterion import SetCriterion
from dino_detr.modeling.matcher import GIOU_EPS, HungarianMatcher, generalized_box_iou

# Normalized cxcywh. Row 0: a 4 x 5 px box on an 800 px image against an overlapping 3 x 4 px one;
# row 1: a 6 px box against a disjoint 5 px one (GIoU < 0); row 2: large boxes (eps irrelevant).
PRED = torch.tensor(
    [[0.500, 0.500, 0.005, 0.006], [0.200, 0.300, 0.008, 0.007], [0.4, 0.5, 0.30, 0.40]], dtype=torch.float64
)
GT = torch.tensor(
    [[0.501, 0.499, 0.004, 0.005], [0.210, 0.305, 0.006, 0.006], [0.45, 0.52, 0.25, 0.45]], dtype=torch.float64
)


def official_giou(boxes1, boxes2, eps):
    """Pairwise GIoU of xyxy boxes, written out: IoU = I / (U + eps), GIoU = IoU - (C - U) / (C + eps)."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    inter_wh = (
        torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:]) - torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    ).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = area1[:, None] + area2[None] - inter
    hull_wh = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:]) - torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return inter / (union + eps) - (hull - union) / (hull + eps)


def _xyxy(boxes):
    return box_convert(boxes, "cxcywh", "xyxy")


def _loss_and_grad(loss_fn):
    pred = PRED.clone().requires_grad_(True)
    loss = loss_fn(pred)
    (grad,) = torch.autograd.grad(loss, pred)
    return loss.detach(), grad


def test_giou_loss_and_gradient_match_the_official_formula_on_tiny_boxes():
    criterion = SetCriterion(2, HungarianMatcher(), {})
    targets = [{"labels": torch.zeros(3, dtype=torch.long), "boxes": GT}]
    indices = [(torch.arange(3), torch.arange(3))]
    num_boxes = 3.0

    def ours(pred):
        return criterion.loss_boxes(pred[None], targets, indices, num_boxes)[1]

    def official(pred, eps=1e-6):
        return (1 - official_giou(_xyxy(pred), _xyxy(GT), eps).diagonal()).sum() / num_boxes

    loss, grad = _loss_and_grad(ours)
    ref_loss, ref_grad = _loss_and_grad(official)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)

    # Mutant: torchvision's default eps (1e-7) gives a measurably different gradient for the tiny
    # boxes (3% and 0.5% here), far outside the tolerance above, and the same one for the large pair.
    _, tv_grad = _loss_and_grad(lambda p: generalized_box_iou_loss(_xyxy(p), _xyxy(GT), reduction="sum") / num_boxes)
    rel = (tv_grad - ref_grad).norm(dim=1) / ref_grad.norm(dim=1)
    assert rel[0] > 0.01 and rel[1] > 1e-3, rel
    assert rel[2] < 1e-4, rel


def test_matching_cost_uses_the_official_giou():
    boxes1, boxes2 = _xyxy(PRED), _xyxy(GT)
    expected = official_giou(boxes1, boxes2, 1e-6)
    torch.testing.assert_close(generalized_box_iou(boxes1, boxes2), expected, rtol=1e-12, atol=1e-15)
    assert GIOU_EPS == 1e-6

    # The matcher's GIoU term is exactly -cost_giou * GIoU (the other costs switched off).
    matcher = HungarianMatcher(cost_class=0.0, cost_bbox=0.0, cost_giou=2.0)
    outputs = {"pred_logits": torch.zeros(1, 3, 2, dtype=torch.float64), "pred_boxes": PRED[None]}
    targets = [{"labels": torch.zeros(3, dtype=torch.long), "boxes": GT}]
    torch.testing.assert_close(matcher.cost_matrix(outputs, targets)[0], (-2.0 * expected).float())

    # Mutant: torchvision's pairwise GIoU (no eps) differs on the tiny boxes by more than float32
    # resolution, so the assertions above would fail with it.
    diff = (torchvision_pairwise_giou(boxes1, boxes2) - expected).abs()
    assert diff[0, 0] > 1e-3 and diff[1, 1] > 1e-3, diff
    assert diff[2, 2] < 1e-4, diff
