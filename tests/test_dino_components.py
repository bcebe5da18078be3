"""DINO's building blocks on small cases: contrastive denoising, its attention mask, the
Hungarian matcher, look forward twice, query selection and position embeddings."""

import itertools
import math

import pytest
import torch
from torch import nn
from torchvision.ops import box_convert

from dino_detr.modeling.decoder import DeformableDecoder, DeformableDecoderLayer, look_forward_twice
from dino_detr.modeling.denoising import contrastive_denoising, denoising_attn_mask, dn_positive_indices
from dino_detr.modeling.encoder import DeformableEncoder, DeformableEncoderLayer, encoder_reference_points
from dino_detr.modeling.heads import make_box_head
from dino_detr.modeling.matcher import HungarianMatcher, assign
from dino_detr.modeling.position_encoding import PositionEmbeddingSineHW, box_sine_embedding
from dino_detr.modeling.query_selection import encoder_output_proposals, select_top_k


def test_denoising_attn_mask_elementwise():
    """2 groups of 2 * max_gt = 4 queries, then 3 matching queries (True = blocked)."""
    mask = denoising_attn_mask(num_groups=2, max_gt=2, num_queries=3)
    group = [0, 0, 0, 0, 1, 1, 1, 1, None, None, None]  # None: matching query
    for i, j in itertools.product(range(11), range(11)):
        if group[i] is None:
            blocked = group[j] is not None  # matching queries never see denoising queries
        else:
            blocked = group[j] is not None and group[j] != group[i]  # groups are isolated
        assert mask[i, j].item() == blocked, (i, j)


def test_contrastive_denoising_layout_and_noise():
    torch.manual_seed(0)
    boxes = [
        torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2]]),
        torch.tensor([[0.5, 0.5, 0.4, 0.4]]),
        torch.zeros(0, 4),
    ]
    labels = [torch.tensor([1, 2]), torch.tensor([0]), torch.zeros(0, dtype=torch.long)]
    label_enc = nn.Embedding(5, 8)
    dn = contrastive_denoising(
        labels, boxes, label_enc, num_queries=7, dn_number=10, label_noise_ratio=0.0, box_noise_scale=0.4, num_classes=4
    )
    assert (dn.num_groups, dn.max_gt, dn.pad_size) == (5, 2, 20)
    assert dn.tgt.shape == (3, 20, 8) and dn.anchors_unsig.shape == (3, 20, 4)
    assert dn.attn_mask.shape == (27, 27)
    # Without label noise every filled slot holds its ground-truth label embedding; unused slots are zero.
    for g in range(dn.num_groups):
        for copy in (0, 1):
            start = 2 * g * dn.max_gt + copy * dn.max_gt
            torch.testing.assert_close(dn.tgt[0, start : start + 2], label_enc(labels[0]))
            torch.testing.assert_close(dn.tgt[1, start], label_enc(labels[1])[0])
            assert dn.tgt[1, start + 1].abs().sum() == 0 and dn.tgt[2, start : start + 2].abs().sum() == 0
    # Positive copies stay within half the box size of the truth (per corner), negatives move farther.
    noised = box_convert(dn.anchors_unsig.sigmoid(), "cxcywh", "xyxy")
    for (q, gt), image in zip(dn_positive_indices([2, 1, 0], dn), range(3)):
        if len(gt) == 0:
            continue
        truth = box_convert(boxes[image][gt], "cxcywh", "xyxy")
        half = boxes[image][gt][:, 2:].repeat(1, 2) / 2
        pos_shift = (noised[image, q] - truth).abs() / half
        neg_shift = (noised[image, q + dn.max_gt] - truth).abs() / half
        assert (pos_shift <= 0.4 + 1e-3).all()
        # negatives: every corner moved by [0.4, 0.8) x half size unless clamped at the image border
        unclamped = (noised[image, q + dn.max_gt] > 1e-3) & (noised[image, q + dn.max_gt] < 1 - 1e-3)
        assert (neg_shift[unclamped] >= 0.4 - 1e-3).all() and (neg_shift <= 0.8 + 1e-3).all()


def test_contrastive_denoising_label_noise_rate():
    torch.manual_seed(0)
    labels = [torch.zeros(50, dtype=torch.long)]
    boxes = [torch.full((50, 4), 0.5)]
    label_enc = nn.Embedding(11, 4)
    dn = contrastive_denoising(
        labels,
        boxes,
        label_enc,
        num_queries=1,
        dn_number=2000,
        label_noise_ratio=0.5,
        box_noise_scale=0.0,
        num_classes=10,
    )
    # Flipped with probability ratio / 2 to a uniform class (which is class 0 again 1/10 of the time).
    unchanged = torch.isclose(dn.tgt[0], label_enc.weight[0]).all(-1)
    rate = 1 - unchanged.float().mean().item()
    assert abs(rate - 0.25 * 0.9) < 0.03


def test_no_denoising_without_boxes_or_budget():
    label_enc = nn.Embedding(3, 4)
    empty = [torch.zeros(0, dtype=torch.long)]
    assert contrastive_denoising(empty, [torch.zeros(0, 4)], label_enc, 5, 10, 0.5, 0.4, 2) is None
    one = [torch.tensor([1])]
    assert contrastive_denoising(one, [torch.full((1, 4), 0.5)], label_enc, 5, 0, 0.5, 0.4, 2) is None


@pytest.mark.parametrize("seed", range(6))
def test_assignment_is_optimal_by_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    q, m = 5, int(torch.randint(1, 5, (1,), generator=g))
    cost = torch.rand(q, m, generator=g)
    rows, cols = assign(cost)
    best = min(sum(cost[r, c].item() for r, c in zip(perm, range(m))) for perm in itertools.permutations(range(q), m))
    assert len(rows) == m and len(set(rows.tolist())) == m and sorted(cols.tolist()) == list(range(m))
    assert math.isclose(cost[rows, cols].sum().item(), best, rel_tol=1e-6)


def test_matcher_prefers_the_right_query():
    """Query 2 has the right box and class, query 0 the right box only, query 1 nothing."""
    logits = torch.full((1, 3, 4), -5.0)
    logits[0, 2, 3] = 5.0
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]]])
    targets = [{"labels": torch.tensor([3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]])}]
    ((rows, cols),) = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert rows.tolist() == [2] and cols.tolist() == [0]
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    ((rows, cols),) = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, empty)
    assert len(rows) == len(cols) == 0
    logits[0, 1, 3] = float("nan")  # a diverged prediction: a clear error, not scipy's
    with pytest.raises(FloatingPointError, match="non-finite"):
        HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)


def test_look_forward_twice_gradient_path():
    """Layer 1's predicted box uses layer 0's *undetached* box: its loss reaches layer 0's
    box head. The decoder's own chain is detached: layer 1's refined box does not."""
    torch.manual_seed(0)
    layer = DeformableDecoderLayer(d_model=32, d_ffn=64, n_levels=1, n_heads=2, n_points=2)
    heads = nn.ModuleList([make_box_head(32), make_box_head(32)])
    for h in heads:
        nn.init.normal_(h.layers[-1].weight, std=0.1)
    decoder = DeformableDecoder(layer, 2, heads, 32)
    memory = torch.randn(1, 12, 32)
    shapes = torch.tensor([[3, 4]])
    args = (
        torch.randn(1, 5, 32),
        torch.rand(1, 5, 4) * 0.5 + 0.25,
        memory,
        shapes,
        torch.tensor([0]),
        torch.ones(1, 1, 2),
        torch.zeros(1, 12, dtype=torch.bool),
    )
    hidden, boxes = decoder(*args)
    prediction = look_forward_twice(heads[1], hidden[1], boxes[1])
    (grad_lft,) = torch.autograd.grad(prediction.sum(), heads[0].layers[-1].weight, allow_unused=True)
    assert grad_lft is not None and grad_lft.abs().sum() > 0
    (grad_chain,) = torch.autograd.grad(boxes[2].sum(), heads[0].layers[-1].weight, allow_unused=True)
    assert grad_chain is None or grad_chain.abs().sum() == 0


def test_query_selection_skips_padding_and_borders():
    torch.manual_seed(0)
    shapes = torch.tensor([[4, 6], [2, 3]])
    padding = torch.zeros(2, 30, dtype=torch.bool)
    padding[1, :24] = torch.tensor([[False] * 4 + [True] * 2] * 4).flatten()  # image 1: 4x4 valid of 4x6
    memory, proposals = encoder_output_proposals(torch.randn(2, 30, 8), padding, shapes.tolist())
    assert torch.isinf(proposals[padding]).all() and (memory[padding] == 0).all()
    centre = proposals[1, 5].sigmoid()  # image 1, level 0, row 0, col 5 (padding) -> inf
    assert torch.isinf(proposals[1, 5]).all() and torch.isnan(centre).sum() == 0
    valid = proposals[0, 7].sigmoid()  # row 1, col 1 of a 4x6 map: centre (1.5/6, 1.5/4), size 0.05
    torch.testing.assert_close(valid, torch.tensor([1.5 / 6, 1.5 / 4, 0.05, 0.05]))
    logits = torch.randn(2, 30, 3)
    top = select_top_k(logits, 4)
    torch.testing.assert_close(top, logits.max(-1).values.topk(4, dim=1).indices)


def test_sine_embeddings():
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    pos = PositionEmbeddingSineHW(4, temperature_h=20, temperature_w=20)(mask)
    assert pos.shape == (1, 8, 2, 3)
    # y features first: y = (row + 1) / H * 2 pi, first feature sin(y / 20**0)
    torch.testing.assert_close(
        pos[0, 0, :, 0], torch.sin(torch.tensor([1.0, 2.0]) / 2 * 2 * math.pi), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        pos[0, 4, 0], torch.sin(torch.tensor([1.0, 2.0, 3.0]) / 3 * 2 * math.pi), atol=1e-5, rtol=0
    )
    emb = box_sine_embedding(torch.tensor([[0.1, 0.2, 0.3, 0.4]]), num_feats=2)
    expected = torch.tensor(
        [
            math.sin(0.2 * 2 * math.pi),
            math.cos(0.2 * 2 * math.pi),
            math.sin(0.1 * 2 * math.pi),
            math.cos(0.1 * 2 * math.pi),
        ]
    )
    torch.testing.assert_close(emb[0, :4], expected, atol=1e-6, rtol=0)


def test_encoder_cpu_slices_match_one_pass():
    """CPU inference with the FFN in token slices (a size that does not divide S, padded
    batch) gives what one pass gives; with autograd the encoder ignores the slicing."""
    torch.manual_seed(0)
    shapes = torch.tensor([[12, 10], [6, 5], [3, 3], [2, 2]])
    start = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
    s = int(shapes.prod(1).sum())
    src, pos = torch.randn(2, s, 32), torch.randn(2, s, 32)
    padding = torch.zeros(2, s, dtype=torch.bool)
    padding[1, 9 * 10 : start[1]] = True  # image 2: three padded rows at level 0
    ratios = torch.tensor([[[1.0, 1.0]] * 4, [[1.0, 0.75]] * 4])
    refs = encoder_reference_points(shapes.tolist(), ratios)
    encoder = DeformableEncoder(DeformableEncoderLayer(32, 64, 0.0, 4, 4, 2), 2, cpu_chunk_size=17).eval()
    with torch.no_grad():
        sliced = encoder(src, pos, refs, shapes, start, padding)
        encoder.cpu_chunk_size = 0
        whole = encoder(src, pos, refs, shapes, start, padding)
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5)
    calls = []
    encoder.layers[0].register_forward_pre_hook(lambda module, args: calls.append(args[-1]))
    encoder.cpu_chunk_size = 17
    src.requires_grad_(True)
    encoder(src, pos, refs, shapes, start, padding).sum().backward()
    assert calls == [0] and src.grad.abs().sum() > 0
