"""The training math of DINO against independent computations: each loss term's formula, weight and
normalisation (focal alpha/gamma, boxes per worker, denoising groups), the matching cost, the auxiliary
and encoder losses with their own matching, where gradients flow (mixed query selection, look forward
twice, the encoder loss), the inverse-sigmoid guard, and the inference top-k with its box scaling.
Each test names the plausible bug it tells apart (see tests/model_mutation_check.py)."""

import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from torchvision.ops import box_convert
from torchvision.ops import generalized_box_iou as pairwise_giou

from dino_detr import get_dino_cfg
from dino_detr.modeling.criterion import SetCriterion, average_num_boxes
from dino_detr.modeling.matcher import HungarianMatcher
from dino_detr.modeling.meta_arch import top_detections
from dino_detr.modeling.query_selection import encoder_output_proposals
from dino_detr.modeling.utils import inverse_sigmoid, refine_box

from train_utils import REPO, TINY_MODEL

WEIGHTS = {"loss_class": 3.0, "loss_bbox": 7.0, "loss_giou": 11.0}


def focal_loss_sum(logits, target, alpha=0.25, gamma=2.0):
    """Sigmoid focal loss summed over all entries, written out (Lin et al.)."""
    p = logits.sigmoid()
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * (1 - p_t) ** gamma * -torch.log(p_t)).sum()


def one_hot_target(shape, matches, labels):
    """(N, Q, C) zeros with 1 at (image, query, label) of every match ``(image, query, gt index)``."""
    target = torch.zeros(shape, dtype=torch.float64)
    for b, q, j in matches:
        target[b, q, labels[b][j]] = 1.0
    return target


def giou_loss_sum(pred, gt):
    return (1 - pairwise_giou(box_convert(pred, "cxcywh", "xyxy"), box_convert(gt, "cxcywh", "xyxy")).diagonal()).sum()


def _targets():
    return [
        {"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.4]]).double()},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2]]).double()},
    ]


def test_loss_terms_weights_and_normalisation_against_the_formulas():
    """Focal alpha 0.25 / gamma 2 over all queries and classes divided by the box count (not by
    the queries too), L1 summed over the coordinates, every term times its own weight."""
    g = torch.Generator().manual_seed(0)
    targets = _targets()
    logits = torch.randn(2, 4, 3, generator=g, dtype=torch.float64) * 2
    boxes = torch.rand(2, 4, 4, generator=g, dtype=torch.float64) * 0.4 + 0.2
    indices = [(torch.tensor([3, 1]), torch.tensor([0, 1])), (torch.tensor([2]), torch.tensor([0]))]
    num_boxes = 2.5
    criterion = SetCriterion(3, HungarianMatcher(), WEIGHTS)
    losses = criterion.set_loss({"pred_logits": logits, "pred_boxes": boxes}, targets, indices, num_boxes, "_x")

    matches = [(0, 3, 0), (0, 1, 1), (1, 2, 0)]
    labels = [t["labels"] for t in targets]
    pred = torch.stack([boxes[b, q] for b, q, _ in matches])
    gt = torch.stack([targets[b]["boxes"][j] for b, _, j in matches])
    expected = {
        "loss_class_x": 3.0 * focal_loss_sum(logits, one_hot_target(logits.shape, matches, labels)) / num_boxes,
        "loss_bbox_x": 7.0 * (pred - gt).abs().sum() / num_boxes,
        "loss_giou_x": 11.0 * giou_loss_sum(pred, gt) / num_boxes,
    }
    assert set(losses) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(losses[key], value, rtol=1e-5, atol=0, msg=key)  # GIoU eps: 1e-6 of these boxes


def test_focal_parameters_are_the_configured_ones():
    """alpha 0.3 / gamma 1.5 reach the loss (not swapped, not torchvision's defaults)."""
    targets = _targets()
    logits = torch.linspace(-3, 3, 2 * 3 * 3, dtype=torch.float64).view(2, 3, 3)
    indices = [(torch.tensor([0, 2]), torch.tensor([0, 1])), (torch.tensor([1]), torch.tensor([0]))]
    criterion = SetCriterion(3, HungarianMatcher(), WEIGHTS, focal_alpha=0.3, focal_gamma=1.5)
    loss = criterion.loss_labels(logits, targets, indices, 3.0)
    target = one_hot_target(logits.shape, [(0, 0, 0), (0, 2, 1), (1, 1, 0)], [t["labels"] for t in targets])
    torch.testing.assert_close(loss, focal_loss_sum(logits, target, 0.3, 1.5) / 3.0, rtol=1e-12, atol=0)


def _fake_workers(monkeypatch, other_worker_boxes):
    """Two workers; ``all_reduce`` adds the other worker's box count."""
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.add_(other_worker_boxes))


def test_num_boxes_is_averaged_over_workers(monkeypatch):
    """DETR's normaliser: the boxes of all workers, divided by the number of workers, at least 1."""
    targets = _targets()  # 3 boxes here
    _fake_workers(monkeypatch, 7.0)
    assert average_num_boxes(targets, "cpu") == 5.0
    _fake_workers(monkeypatch, 0.0)
    assert average_num_boxes(targets[:0], "cpu") == 1.0


def _set(logits, boxes):
    return {"pred_logits": logits, "pred_boxes": boxes}


def test_auxiliary_encoder_and_denoising_losses_each_use_their_own_assignment():
    """Layer 0, layer 1 and the encoder each put the exact ground-truth boxes on different queries:
    each set is matched on its own (box losses 0), and the denoising loss uses the fixed pairs
    and the normaliser num_boxes * groups."""
    targets = _targets()
    gt = [t["boxes"] for t in targets]
    labels = [t["labels"] for t in targets]

    def exact_on(queries):
        """Boxes far from every target except the ground truth on ``queries[b]`` (per image);
        logits confident in the right class there."""
        boxes = torch.tensor([0.9, 0.1, 0.05, 0.05], dtype=torch.float64).repeat(2, 4, 1)
        logits = torch.full((2, 4, 3), -4.0, dtype=torch.float64)
        for b, qs in enumerate(queries):
            for j, q in enumerate(qs):
                boxes[b, q] = gt[b][j]
                logits[b, q, labels[b][j]] = 4.0
        return _set(logits, boxes)

    layers = [exact_on([[1, 3], [0]]), exact_on([[2, 0], [3]])]
    enc = exact_on([[0, 1], [2]])
    dn_groups = 2  # 2 groups of 2 * max_gt = 4 queries; positives at 0, 1 and 4, 5
    dn = exact_on([[0, 1], [0]])
    dn["pred_boxes"] = dn["pred_boxes"].repeat(1, 2, 1)
    dn["pred_logits"] = dn["pred_logits"].repeat(1, 2, 1)
    dn["pred_boxes"][:, 4:6] += 0.01  # group 1 is 0.01 off in every coordinate
    dn_indices = [
        (torch.tensor([0, 1, 4, 5]), torch.tensor([0, 1, 0, 1])),
        (torch.tensor([0, 4]), torch.tensor([0, 0])),
    ]
    criterion = SetCriterion(3, HungarianMatcher(), WEIGHTS)
    losses = criterion(layers, targets, enc_outputs=enc, dn_outputs=[dn], dn_indices=dn_indices, dn_num_groups=2)

    for suffix, out, matches in [
        ("_0", layers[0], [(0, 1, 0), (0, 3, 1), (1, 0, 0)]),
        ("", layers[1], [(0, 2, 0), (0, 0, 1), (1, 3, 0)]),
        ("_enc", enc, [(0, 0, 0), (0, 1, 1), (1, 2, 0)]),
    ]:
        assert losses["loss_bbox" + suffix].item() == 0 and losses["loss_giou" + suffix].abs().item() < 1e-3, suffix
        target = one_hot_target(out["pred_logits"].shape, matches, labels)
        expected = 3.0 * focal_loss_sum(out["pred_logits"], target) / 3.0
        torch.testing.assert_close(losses["loss_class" + suffix], expected, rtol=1e-12, atol=0, msg=suffix)
    # Denoising: 3 boxes x 4 coordinates x 0.01 off in group 1 only, divided by 3 boxes x 2 groups.
    torch.testing.assert_close(losses["loss_bbox_dn"], torch.tensor(7.0 * 0.12 / (3 * dn_groups)).double())


def test_matching_cost_against_the_formula():
    """cost_class * (focal cost of the positive minus that of the negative) + cost_bbox * L1
    - cost_giou * GIoU, with the configured weights and focal parameters."""
    g = torch.Generator().manual_seed(1)
    targets = _targets()
    logits = torch.randn(2, 5, 3, generator=g, dtype=torch.float64) * 2
    boxes = torch.rand(2, 5, 4, generator=g, dtype=torch.float64) * 0.4 + 0.2
    matcher = HungarianMatcher(cost_class=3.0, cost_bbox=7.0, cost_giou=11.0, focal_alpha=0.3, focal_gamma=1.5)
    cost = matcher.cost_matrix(_set(logits, boxes), targets)

    p = logits.flatten(0, 1).sigmoid()[:, torch.cat([t["labels"] for t in targets])]
    pos = 0.3 * (1 - p) ** 1.5 * -torch.log(p)
    neg = 0.7 * p**1.5 * -torch.log(1 - p)
    gt = torch.cat([t["boxes"] for t in targets])
    l1 = (boxes.flatten(0, 1)[:, None] - gt[None]).abs().sum(-1)
    giou = pairwise_giou(box_convert(boxes.flatten(0, 1), "cxcywh", "xyxy"), box_convert(gt, "cxcywh", "xyxy"))
    expected = (3.0 * (pos - neg) + 7.0 * l1 - 11.0 * giou).view(2, 5, 3).float()
    torch.testing.assert_close(cost, expected, rtol=1e-4, atol=1e-4)  # the 1e-8 in the logs, the GIoU eps


def test_inverse_sigmoid_guards_both_ends():
    """logit with x and 1 - x floored at 1e-3: finite at 0 and 1, exact in between; the box
    refinement of a box on the image border has a finite gradient."""
    x = torch.tensor([0.0, 1e-5, 0.3, 1 - 1e-5, 1.0, 1.5], dtype=torch.float64)
    expected = [math.log(max(min(v, 1), 1e-3) / max(1 - min(v, 1), 1e-3)) for v in x.tolist()]
    assert expected[0] == -expected[-1] == -math.log(1e3)
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(inverse_sigmoid(x), expected, rtol=1e-12, atol=0)
    reference = torch.tensor([[0.0, 0.5, 1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    delta = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    refine_box(delta, reference).sum().backward()
    assert torch.isfinite(delta.grad).all() and torch.isfinite(reference.grad).all()


def test_top_detections_against_brute_force():
    """Top (query, class) pairs by sigmoid score over all queries and classes; boxes to xyxy in
    the pixels of a non-square image (width scales x, height scales y)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 4, generator=g)
    boxes = torch.rand(2, 6, 4, generator=g) * 0.4 + 0.2
    sizes = torch.tensor([[50, 80], [120, 30]])
    out_boxes, scores, classes = top_detections(logits, boxes, sizes, 7)
    for b, (h, w) in enumerate(sizes.tolist()):
        pairs = sorted(((logits[b, q, c].sigmoid().item(), q, c) for q in range(6) for c in range(4)), reverse=True)[:7]
        cx, cy, bw, bh = boxes[b, [q for _, q, _ in pairs]].unbind(-1)
        xyxy = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
        torch.testing.assert_close(scores[b], torch.tensor([s for s, _, _ in pairs]))
        assert classes[b].tolist() == [c for _, _, c in pairs]
        torch.testing.assert_close(out_boxes[b], xyxy)


@pytest.fixture(scope="module")
def tiny_model():
    cfg = get_dino_cfg(REPO / "configs" / "dino_demo.yaml", TINY_MODEL)
    cfg.merge_from_list(["MODEL.DINO.DEC_LAYERS", 3, "MODEL.DINO.DEC_PRED_BBOX_EMBED_SHARE", False])
    torch.manual_seed(0)
    model = build_model(cfg)
    for head in model.bbox_embed:  # zero-initialised last layers would hide the refinement chain
        torch.nn.init.normal_(head.layers[-1].weight, std=0.01)
    return model.train()


def _batch():
    g = torch.Generator().manual_seed(0)
    inst = Instances((96, 128))
    inst.gt_boxes = Boxes(torch.tensor([[8.0, 10, 50, 40], [60, 50, 120, 90]]))
    inst.gt_classes = torch.tensor([0, 2])
    return [{"image": torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8, generator=g), "instances": inst}]


def _grad(loss, module):
    grads = torch.autograd.grad(loss, list(module.parameters()), retain_graph=True, allow_unused=True)
    return sum(0.0 if g is None else g.abs().sum().item() for g in grads)


def test_mixed_query_selection_and_look_forward_twice_in_the_model(tiny_model):
    """Through DinoDetr in training: the matching queries' content is the learned ``tgt_embed`` and
    their anchors (the top-k encoder boxes) enter the decoder detached; layer i's box loss reaches
    layer i-1's box head (look forward twice) but not layer i-2's (the chain between layers is
    detached); the encoder loss trains the encoder's box head."""
    model = tiny_model
    seen = {}

    def capture(module, args):
        seen["tgt"], seen["anchors"] = args[0], args[1]

    handle = model.transformer.decoder.register_forward_pre_hook(capture)
    try:
        torch.manual_seed(0)
        with EventStorage():
            losses = model(_batch())
    finally:
        handle.remove()
    num_queries = model.transformer.num_queries
    torch.testing.assert_close(seen["tgt"][0, -num_queries:], model.transformer.tgt_embed.weight, rtol=0, atol=0)
    assert not seen["anchors"].requires_grad

    last, heads = losses["loss_bbox"], model.bbox_embed
    assert _grad(last, heads[2]) > 0 and _grad(last, heads[1]) > 0  # own head, and look forward twice
    assert _grad(last, heads[0]) == 0  # the decoder's own chain is detached
    assert _grad(losses["loss_bbox_1"], heads[0]) > 0
    assert _grad(losses["loss_bbox_enc"], model.transformer.enc_out_bbox_embed) > 0
    assert _grad(losses["loss_class_enc"], model.transformer.enc_out_class_embed) > 0


@pytest.mark.parametrize("eps", [1e-3, 1e-5])
def test_box_prediction_eps_floors_the_previous_box_in_every_layer(eps):
    """``MODEL.DINO.BOX_PREDICTION_EPS`` (mmdetection's head: 1e-5) is the inverse-sigmoid floor of
    the previous box in each layer's prediction: with previous boxes pushed to 1 - 1e-4 (between the
    two floors) the predictions follow ``sigmoid(delta + log(x / max(1 - x, eps)))``."""
    cfg = get_dino_cfg(REPO / "configs" / "dino_demo.yaml", TINY_MODEL)
    cfg.merge_from_list(["MODEL.DINO.BOX_PREDICTION_EPS", eps, "MODEL.DINO.DEC_PRED_BBOX_EMBED_SHARE", False])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    seen = {}

    def saturate(module, args, output):
        hidden, boxes = output
        boxes = [torch.full_like(b, 1 - 1e-4) for b in boxes]
        seen["hidden"] = hidden
        return hidden, boxes

    handle = model.transformer.decoder.register_forward_hook(saturate)
    try:
        images = model.preprocess_image(_batch())
        with torch.no_grad():
            out = model.predict(images, None)
    finally:
        handle.remove()
    for head, hidden, layer in zip(model.bbox_embed, seen["hidden"], out["layers"]):
        x = torch.full((4,), 1 - 1e-4, dtype=torch.float64)
        expected = (head(hidden).double() + torch.log(x / (1 - x).clamp(min=eps))).sigmoid()
        torch.testing.assert_close(layer["pred_boxes"].double(), expected, rtol=0, atol=1e-6)


def test_model_wires_the_configured_weights_costs_and_focal_parameters():
    cfg = get_dino_cfg(REPO / "configs" / "dino_demo.yaml", TINY_MODEL)
    values = {
        "COST_CLASS": 3.0,
        "COST_BBOX": 7.0,
        "COST_GIOU": 11.0,
        "CLASS_LOSS_COEF": 1.5,
        "BBOX_LOSS_COEF": 4.5,
        "GIOU_LOSS_COEF": 2.5,
        "FOCAL_ALPHA": 0.3,
        "FOCAL_GAMMA": 1.5,
    }
    cfg.merge_from_list([x for k, v in values.items() for x in (f"MODEL.DINO.{k}", v)])
    criterion = build_model(cfg).criterion
    matcher = criterion.matcher
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (3.0, 7.0, 11.0)
    assert criterion.weight_dict == {"loss_class": 1.5, "loss_bbox": 4.5, "loss_giou": 2.5}
    assert (criterion.focal_alpha, criterion.focal_gamma, matcher.focal_alpha, matcher.focal_gamma) == (0.3, 1.5) * 2


def test_encoder_proposals_double_in_size_per_level():
    """Proposal of a token: its pixel centre over the level's valid extent, side 0.05 * 2**level."""
    shapes = [(4, 6), (2, 3), (1, 2)]
    padding = torch.zeros(1, 24 + 6 + 2, dtype=torch.bool)
    _, proposals = encoder_output_proposals(torch.randn(1, 32, 8), padding, shapes)
    expected = [
        [(x + 0.5) / w, (y + 0.5) / h, 0.05 * 2**level, 0.05 * 2**level]
        for level, (h, w) in enumerate(shapes)
        for y in range(h)
        for x in range(w)
    ]
    assert torch.isfinite(proposals).all()  # every proposal here lies inside (0.01, 0.99)
    torch.testing.assert_close(proposals[0].sigmoid(), torch.tensor(expected))
