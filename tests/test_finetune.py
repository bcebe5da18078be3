"""Loading a checkpoint of another class count: everything but the class-dependent tensors."""

import logging

import pytest
import torch

from dino_detr import get_dino_cfg
from dino_detr.checkpoint import drop_mismatched_class_tensors
from dino_detr.engine import DinoTrainer, FiniteCheckpointer

from train_utils import REPO

CLASS_TENSORS = [f"class_embed.{i}.{p}" for i in range(3) for p in ("weight", "bias")] + [
    "transformer.enc_out_class_embed.weight",
    "transformer.enc_out_class_embed.bias",
    "label_enc.weight",
]


def _model(num_classes):
    cfg = get_dino_cfg(
        REPO / "configs" / "dino_demo.yaml", ["MODEL.DEVICE", "cpu", "MODEL.DINO.NUM_CLASSES", str(num_classes)]
    )
    return DinoTrainer.build_model(cfg)


def test_filter_drops_only_mismatched_class_tensors():
    torch.manual_seed(0)
    four, two = _model(4), _model(2)
    state = four.state_dict()
    state["input_proj.0.0.weight"] = torch.zeros(3, 3)  # a mismatch that is not about classes: left to the loader
    kept, dropped = drop_mismatched_class_tensors(state, two)
    assert sorted(dropped) == sorted(CLASS_TENSORS)
    assert set(kept) == set(state) - set(CLASS_TENSORS) and "input_proj.0.0.weight" in kept
    assert drop_mismatched_class_tensors(four.state_dict(), four)[1] == []  # same classes: nothing dropped


def test_checkpointer_loads_everything_but_the_class_tensors(tmp_path, caplog):
    torch.manual_seed(0)
    four = _model(4)
    torch.save({"model": four.state_dict()}, tmp_path / "four.pth")
    two = _model(2)
    fresh = {k: v.clone() for k, v in two.state_dict().items()}
    logging.getLogger("dino_detr").addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="dino_detr")
    FiniteCheckpointer(two).load(str(tmp_path / "four.pth"), checkpointables=[])
    loaded, source = two.state_dict(), four.state_dict()
    for key in loaded:
        expected = fresh[key] if key in CLASS_TENSORS else source[key]
        assert torch.equal(loaded[key], expected), key
    assert "9 class-dependent tensor(s) keep their new random initialisation" in caplog.text
    assert "label_enc.weight: checkpoint (5, 128), model (3, 128)" in caplog.text
    # Evaluation (tools/train_net.py --eval-only) refuses such a checkpoint instead of using untrained heads.
    with pytest.raises(
        ValueError,
        match=r"another number of classes \(transformer.enc_out_class_embed.weight has 4 "
        r"rows, the model 2: MODEL.DINO.NUM_CLASSES\)",
    ):
        FiniteCheckpointer(_model(2), reinit_class_tensors=False).load(str(tmp_path / "four.pth"), checkpointables=[])
