"""Contrastive denoising training (DINO Sec. 3.3).

Every ground-truth box enters the decoder ``num_groups`` times as a positive query (small
box noise, to be reconstructed) and ``num_groups`` times as a negative query (larger noise,
to be classified as "no object"). Layout of the P = ``2 * max_gt * num_groups`` denoising
queries placed before the matching queries: group ``g`` occupies ``[2*g*max_gt, 2*(g+1)*max_gt)``,
positives first, negatives next, unused slots (images with fewer boxes) left as zeros.
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn
from torchvision.ops import box_convert

from .utils import inverse_sigmoid

__all__ = ["DenoisingQueries", "contrastive_denoising", "denoising_attn_mask", "dn_positive_indices"]


@dataclass
class DenoisingQueries:
    """Denoising queries of a batch.

    Attributes:
        tgt: (N, P, C) label embeddings of the (noised) labels.
        anchors_unsig: (N, P, 4) inverse-sigmoid noised boxes.
        attn_mask: (P + K, P + K) bool decoder self-attention mask, True = blocked.
        num_groups: denoising groups G.
        max_gt: largest box count in the batch (group = 2 * max_gt queries).
    """

    tgt: torch.Tensor
    anchors_unsig: torch.Tensor
    attn_mask: torch.Tensor
    num_groups: int
    max_gt: int

    @property
    def pad_size(self) -> int:
        """P, the number of denoising queries."""
        return 2 * self.max_gt * self.num_groups


def denoising_attn_mask(num_groups: int, max_gt: int, num_queries: int, device=None) -> torch.Tensor:
    """Self-attention mask: matching queries cannot see any denoising query, a denoising
    group cannot see the other groups (it can see the matching queries).

    Returns:
        (P + K, P + K) bool, True = attention blocked; P = 2 * max_gt * num_groups, K = num_queries.
    """
    pad = 2 * max_gt * num_groups
    size = pad + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[pad:, :pad] = True
    group = torch.arange(pad, device=device) // (2 * max_gt) if max_gt > 0 else torch.zeros(0, device=device)
    mask[:pad, :pad] = group[:, None] != group[None, :]
    return mask


# The random numbers of the noise are drawn by these two functions only, so a test can give both
# implementations the same draws (tests/test_training_fixtures.py replaces them with the official ones).
def _box_draws(boxes: torch.Tensor):
    """(M, 4) random signs (+-1) and (M, 4) uniform [0, 1) magnitudes of the box noise."""
    return torch.randint_like(boxes, 0, 2) * 2.0 - 1.0, torch.rand_like(boxes)


def _label_draws(labels: torch.Tensor, num_classes: int):
    """(M,) uniform [0, 1) flip draws and (M,) random classes in [0, num_classes) of the label noise."""
    return torch.rand(labels.shape, device=labels.device), torch.randint_like(labels, 0, num_classes)


def _noise_boxes(boxes: torch.Tensor, negative: torch.Tensor, scale: float) -> torch.Tensor:
    """Move each corner by up to ``scale`` x half the box size: ``|noise| < 1`` x for
    positives, in ``[1, 2)`` x for negatives, then clamp to the image.

    Args:
        boxes: (M, 4) normalized cxcywh; negative: (M,) bool.
    Returns:
        (M, 4) normalized cxcywh.
    """
    xyxy = box_convert(boxes, "cxcywh", "xyxy")
    half_wh = boxes[:, 2:].repeat(1, 2) / 2
    sign, uniform = _box_draws(boxes)
    magnitude = uniform + negative[:, None].to(boxes.dtype)
    xyxy = (xyxy + sign * magnitude * half_wh * scale).clamp(min=0.0, max=1.0)
    return box_convert(xyxy, "xyxy", "cxcywh")


def _flip_labels(labels: torch.Tensor, ratio: float, num_classes: int) -> torch.Tensor:
    """Replace each label by a uniformly random class with probability ``ratio``."""
    uniform, random_labels = _label_draws(labels, num_classes)
    return torch.where(uniform < ratio, random_labels, labels)


def contrastive_denoising(
    gt_labels: List[torch.Tensor],
    gt_boxes: List[torch.Tensor],
    label_enc: nn.Embedding,
    num_queries: int,
    dn_number: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    num_classes: int,
) -> Optional[DenoisingQueries]:
    """Build the denoising queries of a batch.

    Args:
        gt_labels: per image (M_b,) int64 class ids in [0, num_classes).
        gt_boxes: per image (M_b, 4) normalized cxcywh.
        label_enc: embedding of the (noised) labels.
        num_queries: K matching queries following the denoising ones.
        dn_number: denoising query budget; ``num_groups = max(dn_number // max_gt, 1)``.
        label_noise_ratio: labels are flipped with probability ``0.5 * label_noise_ratio``.
        box_noise_scale: box noise, relative to half the box size.
    Returns:
        the queries, or None when ``dn_number == 0`` or the batch has no box.
    """
    counts = [len(l) for l in gt_labels]
    max_gt = max(counts, default=0)
    if dn_number <= 0 or max_gt == 0:
        return None
    num_groups = max(dn_number // max_gt, 1)
    device = gt_boxes[0].device
    # One entry per (copy, image, box); copy c = 2 * group + (0 positive | 1 negative).
    batch_idx = torch.cat([torch.full((n,), b, dtype=torch.long, device=device) for b, n in enumerate(counts)])
    box_idx = torch.cat([torch.arange(n, device=device) for n in counts])
    copies = torch.arange(2 * num_groups, device=device).repeat_interleave(len(box_idx))
    batch_idx = batch_idx.repeat(2 * num_groups)
    slot = copies * max_gt + box_idx.repeat(2 * num_groups)
    labels = torch.cat(gt_labels).repeat(2 * num_groups)
    boxes = torch.cat(gt_boxes).repeat(2 * num_groups, 1)

    if label_noise_ratio > 0:
        labels = _flip_labels(labels, label_noise_ratio * 0.5, num_classes)
    if box_noise_scale > 0:
        boxes = _noise_boxes(boxes, negative=copies % 2 == 1, scale=box_noise_scale)

    pad = 2 * max_gt * num_groups
    n = len(gt_labels)
    tgt = label_enc.weight.new_zeros(n, pad, label_enc.embedding_dim)
    anchors = boxes.new_zeros(n, pad, 4)
    tgt[batch_idx, slot] = label_enc(labels)
    anchors[batch_idx, slot] = inverse_sigmoid(boxes)
    return DenoisingQueries(
        tgt=tgt,
        anchors_unsig=anchors,
        attn_mask=denoising_attn_mask(num_groups, max_gt, num_queries, device),
        num_groups=num_groups,
        max_gt=max_gt,
    )


def dn_positive_indices(counts: List[int], dn: DenoisingQueries) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The fixed assignment of the denoising loss: per image, (query index, gt index) of the
    positive queries of all groups."""
    indices = []
    offsets = torch.arange(dn.num_groups) * (2 * dn.max_gt)
    for n in counts:
        gt = torch.arange(n).repeat(dn.num_groups)
        indices.append(((offsets[:, None] + torch.arange(n)[None]).flatten(), gt))
    return indices
