#!/usr/bin/env python
"""Mutation check of the model code: plants plausible one-line bugs in dino_detr/modeling (the paper's
three ideas, the losses, the matcher, denoising, query selection, inference) and shows that the fast
model tests catch each one.

For every mutant, a copy of the repository's package, tests, configs and tools gets one edit and the
tests in TESTS run against the copy until the first failure (the same mechanics as the CUDA check,
tests/cuda_emulation/mutation_check.py). A mutant is caught when the tests fail (or crash, or hang
past --timeout). Prints one line per mutant and "caught X of Y"; exits 1 when a mutant survives.
Needs no GPU; about 10 minutes on 2 cores.

    python tests/model_mutation_check.py [--only NAME] [--timeout 600]
"""

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_emulation.mutation_check import check, plant, run_tests  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M = "dino_detr/modeling/"

# name: (file, text, replacement); every occurrence is replaced.
MUTANTS = {
    # Contrastive denoising (Sec. 3.3): layout, noise, the fixed assignment, the loss normaliser.
    "dn: negatives as close as positives": (
        M + "denoising.py",
        "magnitude = uniform + negative[:, None].to(boxes.dtype)",
        "magnitude = uniform",
    ),
    "dn: no negative queries": (M + "denoising.py", "negative=copies % 2 == 1", "negative=copies % 2 == 2"),
    "dn: negatives labelled as positives": (
        M + "denoising.py",
        "offsets = torch.arange(dn.num_groups) * (2 * dn.max_gt)",
        "offsets = torch.arange(dn.num_groups) * (2 * dn.max_gt) + dn.max_gt",
    ),
    "dn: label flip ratio not halved": (M + "denoising.py", "label_noise_ratio * 0.5", "label_noise_ratio"),
    "dn: box noise of the whole box size": (
        M + "denoising.py",
        "half_wh = boxes[:, 2:].repeat(1, 2) / 2",
        "half_wh = boxes[:, 2:].repeat(1, 2)",
    ),
    "dn: groups of 2 x max_gt budget": (
        M + "denoising.py",
        "num_groups = max(dn_number // max_gt, 1)",
        "num_groups = max(dn_number // (2 * max_gt), 1)",
    ),
    "dn: padding slots per group of max_gt": (
        M + "denoising.py",
        "slot = copies * max_gt + box_idx",
        "slot = copies // 2 * max_gt + box_idx",
    ),
    "dn mask: matching queries see denoising": (
        M + "denoising.py",
        "mask[pad:, :pad] = True",
        "mask[pad:, :pad] = False",
    ),
    "dn mask: positives and negatives apart": (
        M + "denoising.py",
        "group = torch.arange(pad, device=device) // (2 * max_gt)",
        "group = torch.arange(pad, device=device) // max_gt",
    ),
    "dn loss: not divided by the groups": (M + "criterion.py", "num_boxes * dn_num_groups", "num_boxes"),
    # Mixed query selection (Sec. 3.4).
    "query selection: content from the encoder": (
        M + "transformer.py",
        "tgt = self.tgt_embed.weight[None].expand(memory.shape[0], -1, -1)",
        "tgt = gather_queries(output_memory, topk).detach()",
    ),
    "query selection: anchors not detached": (
        M + "transformer.py",
        "return tgt, boxes_unsig.detach(),",
        "return tgt, boxes_unsig,",
    ),
    "query selection: top-k by mean logit": (M + "query_selection.py", "logits.max(-1)[0]", "logits.mean(-1)"),
    "proposals: one size for every level": (M + "query_selection.py", "0.05 * (2.0**lvl)", "0.05"),
    # Look forward twice (Sec. 3.5).
    "look forward once": (
        M + "meta_arch.py",
        "boxes = look_forward_twice(box_head, hidden, reference, self.box_prediction_eps)",
        "boxes = look_forward_twice(box_head, hidden, reference.detach(), self.box_prediction_eps)",
    ),
    "decoder chain not detached": (M + "decoder.py", "reference = refined.detach()", "reference = refined"),
    # Loss terms: weights, normalisation, focal parameters; auxiliary and encoder losses.
    "num_boxes summed over workers": (
        M + "criterion.py",
        "torch.clamp(num / comm.get_world_size(), min=1)",
        "torch.clamp(num, min=1)",
    ),
    "focal loss: alpha and gamma swapped": (
        M + "criterion.py",
        "alpha=self.focal_alpha, gamma=self.focal_gamma",
        "alpha=self.focal_gamma, gamma=self.focal_alpha",
    ),
    "focal loss: no alpha weighting": (M + "criterion.py", "alpha=self.focal_alpha,", "alpha=-1,"),
    "class loss also divided by the queries": (
        M + "criterion.py",
        "return loss / num_boxes",
        "return loss / num_boxes / logits.shape[1]",
    ),
    "L1 loss averaged over coordinates": (
        M + "criterion.py",
        'F.l1_loss(pred, gt, reduction="sum") / num_boxes',
        'F.l1_loss(pred, gt, reduction="sum") / num_boxes / 4',
    ),
    "GIoU loss weighted by the L1 coefficient": (
        M + "meta_arch.py",
        '"loss_giou": d.GIOU_LOSS_COEF',
        '"loss_giou": d.BBOX_LOSS_COEF',
    ),
    "auxiliary layers matched like the last": (
        M + "criterion.py",
        "self.set_loss(out, targets, self.matcher(out, targets), num_boxes, suffix)",
        "self.set_loss(out, targets, self.matcher(decoder_outputs[-1], targets), num_boxes, suffix)",
    ),
    "encoder loss does not train the encoder box head": (
        M + "transformer.py",
        "gather_queries(logits, topk), boxes_unsig.sigmoid()",
        "gather_queries(logits, topk), boxes_unsig.detach().sigmoid()",
    ),
    # Hungarian matcher.
    "matcher: L1 and GIoU costs swapped": (
        M + "meta_arch.py",
        "HungarianMatcher(d.COST_CLASS, d.COST_BBOX, d.COST_GIOU,",
        "HungarianMatcher(d.COST_CLASS, d.COST_GIOU, d.COST_BBOX,",
    ),
    "matcher: focal cost without the negative term": (
        M + "matcher.py",
        "return pos[:, labels] - neg[:, labels]",
        "return pos[:, labels]",
    ),
    "matcher: focal cost alpha on the negatives": (
        M + "matcher.py",
        "neg = (1 - alpha) * prob.pow(gamma)",
        "neg = alpha * prob.pow(gamma)",
    ),
    "matcher: L2 box cost": (
        M + "matcher.py",
        "torch.cdist(boxes, gt_boxes, p=1)",
        "torch.cdist(boxes, gt_boxes, p=2)",
    ),
    # Inference and numerical guards.
    "inference: classes read as query index": (
        M + "meta_arch.py",
        "return boxes * scale, scores, index % num_classes",
        'return boxes * scale, scores, torch.div(index, num_classes, rounding_mode="floor")',
    ),
    "inference: height and width swapped": (
        M + "meta_arch.py",
        "image_sizes.flip(-1).repeat(1, 2)",
        "image_sizes.repeat(1, 2)",
    ),
    "box prediction: configured floor ignored": (
        M + "meta_arch.py",
        "boxes = look_forward_twice(box_head, hidden, reference, self.box_prediction_eps)",
        "boxes = look_forward_twice(box_head, hidden, reference)",
    ),
    "inverse sigmoid: 1 - x unguarded": (
        M + "utils.py",
        "x.clamp(min=eps) / (1 - x).clamp(min=eps)",
        "x.clamp(min=eps) / (1 - x)",
    ),
}

# Fastest first; each file runs until its first failure. The official-code fixtures join when present.
TESTS = [
    "tests/test_dino_components.py",
    "tests/test_giou.py",
    "tests/test_training_math.py",
    "tests/test_training_fixtures.py",
    "tests/test_model.py::test_batch_mixing_images_with_and_without_boxes",
    "tests/test_model.py::test_eval_rescales_to_requested_size",
    "tests/test_model.py::test_overfits_two_images",
]
COPIED = ["dino_detr", "tests", "configs", "tools", "pyproject.toml"]


def run_mutant(name, edit, work, timeout):
    """(caught, what failed) for one mutant (``edit`` None: the unmutated copy)."""
    root = os.path.join(work, (name or "unmutated").replace(" ", "_").replace(":", ""))
    for entry in COPIED:
        source = os.path.join(ROOT, entry)
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(root, entry), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(source, root)
    if edit:
        path, text, replacement = edit
        plant(os.path.join(root, path), text, replacement, name)
    tests = [t for t in TESTS if os.path.exists(os.path.join(root, t.split("::")[0]))]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
    try:
        return run_tests(tests, env, root, timeout)
    finally:
        shutil.rmtree(root)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(MUTANTS), help="run one mutant")
    parser.add_argument("--timeout", type=int, default=600, help="seconds before a mutant's test run counts as hung")
    args = parser.parse_args()
    names = [args.only] if args.only else list(MUTANTS)
    with tempfile.TemporaryDirectory(prefix="model_mutants_") as work:
        return check(names, lambda name: run_mutant(name, MUTANTS.get(name), work, args.timeout))


if __name__ == "__main__":
    sys.exit(main())
