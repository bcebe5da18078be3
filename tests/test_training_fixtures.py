"""One training step against the reference implementations, recorded in ``tests/fixtures/``.

Each fixture is one forward + backward of a small DINO (2 encoder + 3 decoder layers, 2 feature
levels, 6 queries, 4 denoising groups) run in float64 by the official DINO code or by detrex
(``tests/fixtures/make_training_fixtures.py``, which runs the fetched reference code; CI only reads
the fixtures). The weights are the fixture's seeded draws under the reference's tensor names; they
go through this project's converter (``convert_state_dict``, the code of
``tools/convert_checkpoint.py``) into ``DinoDetr`` built from the converted config, which then
trains on the same batch with the reference's denoising noise (its random draws, given to
``denoising._label_draws`` / ``_box_draws``). Compared: every decoder layer's logits and boxes
(matching and denoising queries) and the encoder's selected proposals within 1e-10, every weighted
loss term within 1e-10, and every parameter's gradient (norm, sum and 8 entries) within 1e-9
relative to its norm.
"""

import glob
import os
import re
import sys

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from dino_detr import add_dino_config
from dino_detr.checkpoint import convert_state_dict
from dino_detr.checkpoint.convert import _rules_for
from dino_detr.checkpoint.rename import rename
from dino_detr.modeling import denoising

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
sys.path.insert(0, FIXTURES)
from training_batch import detectron2_inputs, fixture_weights  # noqa: E402

OUTPUT_TOL = 1e-10
GRAD_RTOL = 1e-9
FIXTURE_FILES = sorted(glob.glob(os.path.join(FIXTURES, "training_*.pt")))


def _loss_name(reference_key: str) -> str:
    """Official / detrex loss key -> this project's (``loss_ce`` -> ``loss_class``, ``_interm`` -> ``_enc``)."""
    return re.sub(r"_interm\Z", "_enc", reference_key.replace("loss_ce", "loss_class"))


def _reference_state_dict(record):
    w = record["weights"]
    sd = fixture_weights(list(zip(w["names"], w["shapes"])), w["aliases"])
    sums = torch.stack([sd[n].double().sum() for n in w["names"]])
    drifted = [n for n, a, b in zip(w["names"], sums, w["sums"]) if not torch.allclose(a, b, rtol=1e-12, atol=0)]
    assert not drifted, f"the fixture weights are no longer drawn as recorded: {drifted[:3]}"
    return sd


def _our_opts(record):
    """Settings the converter cannot read off the tensors."""
    s = record["settings"]
    return [
        "MODEL.DEVICE", "cpu",
        "MODEL.BACKBONE.FREEZE_AT", str(s["freeze_at"]),
        "MODEL.DINO.NHEADS", str(s["nheads"]),
        "MODEL.DINO.ENC_N_POINTS", str(s["enc_n_points"]),
        "MODEL.DINO.DEC_N_POINTS", str(s["dec_n_points"]),
        "MODEL.DINO.NUM_SELECT", str(s["num_select"]),
        # our DN_NUMBER is the query budget: groups = DN_NUMBER // (most boxes in an image)
        "MODEL.DINO.DN_NUMBER", str(record["noise"]["num_groups"] * record["noise"]["max_gt"]),
        "MODEL.DINO.DN_LABEL_NOISE_RATIO", str(s["dn_label_noise_ratio"]),
        "MODEL.DINO.DN_BOX_NOISE_SCALE", str(s["dn_box_noise_scale"]),
    ]  # fmt: skip


def build_converted_model(record):
    """DinoDetr (float64, training mode) with the fixture's reference weights, converted."""
    conv = convert_state_dict(_reference_state_dict(record), record["source"], "source")
    cfg = get_cfg()
    add_dino_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, conv.base_config))
    cfg.merge_from_list(conv.opts() + _our_opts(record))
    model = build_model(cfg).double()
    model.load_state_dict(conv.state_dict, strict=True)
    # the normalization constants in float64 (the buffers were made in float32)
    model.pixel_mean.copy_(torch.tensor(cfg.MODEL.PIXEL_MEAN, dtype=torch.float64).view(-1, 1, 1))
    model.pixel_std.copy_(torch.tensor(cfg.MODEL.PIXEL_STD, dtype=torch.float64).view(-1, 1, 1))
    return model.train()


def inject_reference_noise(monkeypatch, noise):
    """Our denoising draws := the reference's (same entries: copy, image, box)."""

    def label_draws(labels, num_classes):
        assert labels.shape == noise["label_uniform"].shape, "denoising entries differ from the reference's"
        random_labels = labels.clone()
        random_labels[noise["label_chosen"]] = noise["random_labels"]
        return noise["label_uniform"], random_labels

    def box_draws(boxes):
        assert boxes.shape == noise["box_uniform"].shape, "denoising entries differ from the reference's"
        return noise["box_sign"].to(boxes.dtype), noise["box_uniform"]

    monkeypatch.setattr(denoising, "_label_draws", label_draws)
    monkeypatch.setattr(denoising, "_box_draws", box_draws)


def train_step(model, monkeypatch, record):
    """Losses, predictions (``DinoDetr.predict``'s dict) after one backward of the summed losses."""
    inject_reference_noise(monkeypatch, record["noise"])
    captured = {}
    predict = model.predict

    def capture(*args, **kwargs):
        captured.update(predict(*args, **kwargs))
        return captured

    monkeypatch.setattr(model, "predict", capture)
    losses = model(detectron2_inputs())
    sum(losses.values()).backward()
    return losses, captured


def _close(name, ours, ref, tol=OUTPUT_TOL):
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    err = (ours.detach() - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= tol, f"{name}: max |ours - reference| = {err:.3g} > {tol:g}"


@pytest.fixture(scope="module", params=[os.path.basename(f)[len("training_") : -3] for f in FIXTURE_FILES])
def step(request):
    record = torch.load(os.path.join(FIXTURES, f"training_{request.param}.pt"), weights_only=True)
    model = build_converted_model(record)
    with pytest.MonkeyPatch.context() as mp:
        losses, outputs = train_step(model, mp, record)
    return record, model, losses, outputs


def test_fixtures_present():
    names = {os.path.basename(f) for f in FIXTURE_FILES}
    expected = {"training_official_shared_heads.pt", "training_official_per_layer_heads.pt", "training_detrex.pt"}
    assert expected <= names, f"missing fixtures: {sorted(expected - names)}"


def test_predictions_match(step):
    record, _, _, outputs = step
    assert len(outputs["layers"]) == len(record["layers"])
    for i, (ours, ref) in enumerate(zip(outputs["layers"], record["layers"])):
        for key in ("pred_logits", "pred_boxes"):
            _close(f"decoder layer {i} {key}", ours[key], ref[key])
    assert len(outputs["dn_layers"]) == len(record["dn_layers"])
    for i, (ours, ref) in enumerate(zip(outputs["dn_layers"], record["dn_layers"])):
        for key in ("pred_logits", "pred_boxes"):
            _close(f"denoising layer {i} {key}", ours[key], ref[key])
    for key in ("pred_logits", "pred_boxes"):
        _close(f"encoder {key}", outputs["enc"][key], record["enc"][key])


def test_every_loss_term_matches(step):
    record, _, losses, _ = step
    expected = {_loss_name(k): v for k, v in record["losses"].items()}
    assert set(losses) == set(expected), (
        f"loss terms differ: only ours {sorted(set(losses) - set(expected))}, "
        f"only the reference {sorted(set(expected) - set(losses))}"
    )
    for key, value in expected.items():
        _close(f"loss {key}", losses[key], value)
    _close("total loss", sum(losses.values()), record["total_loss"])


def test_every_gradient_matches(step):
    record, model, _, _ = step
    grads = record["grads"]
    rules = _rules_for(record["source"], record["weights"]["names"])
    ours = dict(model.named_parameters(remove_duplicate=False))
    covered = set()
    for i, name in enumerate(grads["names"]):
        # the reference may list a shared head under its alias transformer.decoder.*_embed (converter: None)
        our_name = rename(name, rules, record["source"]) or rename(
            name.removeprefix("transformer.decoder."), rules, record["source"]
        )
        assert our_name in ours, f"{name} -> {our_name}: not a parameter of DinoDetr"
        param = ours[our_name]
        covered.add(id(param))
        assert param.requires_grad, f"{our_name} ({name}) is frozen here but trained by the reference"
        grad = param.grad.flatten() if param.grad is not None else torch.zeros(param.numel(), dtype=param.dtype)
        norm = grads["norm"][i].item()
        tol = GRAD_RTOL * max(norm, 1e-30)
        assert abs(grad.norm().item() - norm) <= tol, (
            f"gradient of {our_name} ({name}): norm {grad.norm().item():.12g} != reference {norm:.12g}"
        )
        assert abs(grad.sum().item() - grads["sum"][i].item()) <= tol, f"gradient sum of {our_name} ({name})"
        err = (grad[grads["index"][i]] - grads["values"][i]).abs().max().item()
        assert err <= tol, f"gradient entries of {our_name} ({name}): max error {err:.3g} > {tol:.3g}"
    trained_here = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    assert not trained_here, f"trained here but frozen (or absent) in the reference: {trained_here[:5]}"
