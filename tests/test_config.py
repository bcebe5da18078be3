"""dino_detr.config: add_dino_config only adds keys; the tools resolve MODEL.DEVICE."""

import torch
from detectron2.config import get_cfg

from dino_detr import add_dino_config, resolve_device


def _flat(node, prefix=""):
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_add_dino_config_keeps_detectron2_defaults():
    base = _flat(get_cfg())
    cfg = get_cfg()
    add_dino_config(cfg)
    extended = _flat(cfg)
    assert {k: extended[k] for k in base if extended[k] != base[k]} == {}
    assert "MODEL.DINO.NUM_QUERIES" in extended and cfg.MODEL.DEVICE == "cuda"


def test_resolve_device_falls_back_to_cpu_without_cuda(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cuda") == "cpu"
    assert resolve_device("cuda:1") == "cpu"
    assert "CUDA is not available" in caplog.text
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("meta") == "meta"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda:1") == "cuda:1"
