"""Conversion of the official DINO Swin-L checkpoints (4- and 5-scale) and of the ImageNet-22k Swin-L
classifier: every tensor placed or explained, buffers checked, strict loading, failures named.

Source checkpoints are random tensors with the names and shapes of the real models, read from the
manifests in ``tests/manifests`` (generated from IDEA-Research/DINO and
microsoft/Swin-Transformer); derived buffers get the values those models compute."""

import argparse
import importlib.util
import os
import re

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from test_convert_checkpoint import manifest, random_checkpoint

from dino_detr import get_dino_cfg
from dino_detr.checkpoint import check_against_model, convert_state_dict
from dino_detr.modeling.swin import relative_position_index, shifted_window_mask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSIFIER = "swin_large_patch4_window12_384_22k"


def with_buffers(sd):
    """The buffers a Swin model derives from its architecture, as the source code computes them."""
    for key, value in sd.items():
        if key.endswith("relative_position_index"):
            sd[key] = relative_position_index(int(value.shape[0] ** 0.5))
        elif key.endswith("attn_mask"):
            window = int(value.shape[1] ** 0.5)
            side = window * int(value.shape[0] ** 0.5)
            sd[key] = shifted_window_mask(side, side, window, window // 2)
    return sd


@pytest.fixture(scope="module")
def official_4scale():
    return with_buffers(random_checkpoint("official_dino_swinl_4scale"))


@pytest.fixture(scope="module")
def classifier():
    return with_buffers(random_checkpoint(CLASSIFIER))


def model_of(config, opts, device="cpu"):
    with torch.device(device):
        cfg = get_dino_cfg(os.path.join(REPO, config), opts)
        cfg.MODEL.DEVICE = device
        return build_model(cfg)


def test_official_swinl_4scale_converts_and_loads_strictly(official_4scale, tmp_path):
    src = official_4scale
    conv = convert_state_dict(src, "official", "coco80")
    assert conv.base_config == "configs/dino_swinl_4scale.yaml"
    assert conv.config["MODEL.SWIN.OUT_FEATURES"] == ["swin1", "swin2", "swin3"]
    assert conv.config["MODEL.SWIN.WINDOW_SIZE"] == 12 and conv.config["MODEL.SWIN.DEPTHS"] == [2, 2, 18, 2]
    # 12 head aliases and 24 relative_position_index buffers (one per block) are checked, not copied
    assert len(conv.state_dict) == len(src) - 12 - 24
    assert any("24 Swin relative_position_index" in n for n in conv.notes)
    path = str(tmp_path / "converted.pth")
    torch.save({"model": conv.state_dict}, path)
    model = model_of(conv.base_config, conv.opts())
    DetectionCheckpointer(model).load(path)
    model_sd = model.state_dict()
    assert set(model_sd) == set(conv.state_dict)
    for k, v in model_sd.items():
        assert torch.equal(v, conv.state_dict[k]), k
    pairs = {
        "backbone.0.patch_embed.proj.weight": "backbone.patch_embed.proj.weight",
        "backbone.0.layers.2.blocks.17.attn.relative_position_bias_table": "backbone.layers.2.blocks.17.attn.relative_position_bias_table",
        "backbone.0.layers.1.downsample.reduction.weight": "backbone.layers.1.downsample.reduction.weight",
        "backbone.0.norm3.bias": "backbone.norm3.bias",
        "input_proj.2.0.weight": "input_proj.2.0.weight",
    }
    for s, o in pairs.items():
        assert torch.equal(model_sd[o], src[s]), (s, o)


def test_official_swinl_5scale_layout():
    src = with_buffers(random_checkpoint("official_dino_swinl_5scale"))
    conv = convert_state_dict(src, "official", "source")
    assert conv.base_config == "configs/dino_swinl_5scale.yaml"
    assert conv.config["MODEL.DINO.IN_FEATURES"] == ["swin0", "swin1", "swin2", "swin3"]
    assert conv.config["MODEL.DINO.NUM_CLASSES"] == 91
    check_against_model(conv.state_dict, model_of(conv.base_config, conv.opts(), "meta"))


def test_wrong_buffer_or_stage_fails_naming_it(official_4scale):
    src = dict(official_4scale)
    key = "backbone.0.layers.2.blocks.5.attn.relative_position_index"
    src[key] = src[key].flip(0)
    with pytest.raises(ValueError, match=re.escape(key)):
        convert_state_dict(src, "official")
    src = {k: v for k, v in official_4scale.items() if not k.startswith("backbone.0.norm1.")}
    with pytest.raises(ValueError, match=r"input_proj levels take \[384, 768, 1536\] channels"):
        convert_state_dict(src, "official")
    with pytest.raises(ValueError, match=r"backbone\.0\.patch_embed.*source 'official'"):
        convert_state_dict(official_4scale, "detrex")


def test_classifier_to_backbone(classifier):
    conv = convert_state_dict(classifier, "swin-imagenet")
    assert conv.backbone_only and conv.base_config == "configs/dino_swinl_4scale.yaml"
    assert all(k.startswith("backbone.") for k in conv.state_dict)
    assert torch.equal(
        conv.state_dict["backbone.layers.3.blocks.1.mlp.fc2.bias"], classifier["layers.3.blocks.1.mlp.fc2.bias"]
    )
    m = manifest(CLASSIFIER)
    derived = [k for k, _ in m["tensors"] if k.endswith(("relative_position_index", "attn_mask"))]
    assert len(derived) == 24 + 11  # an index per block; a mask per shifted block whose map exceeds the window
    assert set(conv.state_dict) == {"backbone." + k for k in classifier} - {
        "backbone." + k for k in derived + ["head.weight", "head.bias", "norm.weight", "norm.bias"]
    }
    assert any("head.weight (21841, 1536)" in n for n in conv.notes)
    # the backbone of the 4- and 5-scale models, apart from their per-stage output norms
    for config in ("configs/dino_swinl_4scale.yaml", "configs/dino_swinl_5scale.yaml"):
        check_against_model(conv.state_dict, model_of(config, [], "meta"), backbone_only=True)
    model = model_of("configs/dino_swinl_4scale.yaml", [], "meta")
    with pytest.raises(KeyError, match="does not match the model"):  # the detector is missing
        check_against_model(conv.state_dict, model)
    del conv.state_dict["backbone.layers.2.blocks.3.norm2.bias"]
    with pytest.raises(KeyError, match=r"backbone\.layers\.2\.blocks\.3\.norm2\.bias"):
        check_against_model(conv.state_dict, model, backbone_only=True)


def test_classifier_failures_name_the_tensor(classifier, official_4scale):
    src = dict(classifier)
    src["layers.0.blocks.1.attn_mask"] = torch.zeros_like(src["layers.0.blocks.1.attn_mask"])
    with pytest.raises(ValueError, match=r"layers\.0\.blocks\.1\.attn_mask"):
        convert_state_dict(src, "swin-imagenet")
    src = dict(classifier, absolute_pos_embed=torch.zeros(1, 9216, 192))
    with pytest.raises(KeyError, match="absolute_pos_embed"):
        convert_state_dict(src, "swin-imagenet")
    with pytest.raises(ValueError, match="detection checkpoint.*source 'official'"):
        convert_state_dict(official_4scale, "swin-imagenet")
    with pytest.raises(KeyError, match=r"patch_embed\.proj\.weight"):
        convert_state_dict(classifier, "official")


def test_cli_converts_classifier_and_training_starts_from_it(classifier, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", os.path.join(REPO, "tools", "convert_checkpoint.py")
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    src, out = tmp_path / "swin_22k.pth", tmp_path / "backbone.pth"
    torch.save({"model": classifier, "args": argparse.Namespace(img_size=384)}, src)
    cli.main(["--source", "swin-imagenet", str(src), str(out)])
    printed = capsys.readouterr().out
    assert "strict load into the model verified" in printed and "train from it with:" in printed
    assert "--config-file configs/dino_swinl_4scale.yaml MODEL.WEIGHTS" in printed and "--eval-only" not in printed
    loaded = torch.load(str(out), weights_only=True)["model"]
    assert torch.equal(loaded["backbone.patch_embed.norm.weight"], classifier["patch_embed.norm.weight"])


def test_backbone_weights_load_into_dino_with_detectron2(tmp_path):
    """A (tiny) Swin classifier -> backbone-only checkpoint -> MODEL.WEIGHTS of a DINO: Detectron2's
    checkpointer puts every converted tensor into the backbone and leaves the rest initialised."""
    from dino_detr.checkpoint import save_detectron2_checkpoint
    from dino_detr.modeling.swin import SwinTransformer

    tiny = dict(embed_dim=16, depths=[1, 2, 2, 1], num_heads=[1, 2, 2, 4], window=4)
    body = SwinTransformer(**tiny, out_features=["swin3"]).state_dict()
    classifier = {k: v for k, v in body.items() if not k.startswith("norm3.")}
    classifier.update(
        {
            "norm.weight": torch.ones(128),
            "norm.bias": torch.zeros(128),
            "head.weight": torch.zeros(10, 128),
            "head.bias": torch.zeros(10),
        }
    )
    for i, depth in enumerate(tiny["depths"]):
        for j in range(depth):
            classifier[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = relative_position_index(4)
    conv = convert_state_dict(classifier, "swin-imagenet")
    assert conv.config["MODEL.SWIN.DEPTHS"] == [1, 2, 2, 1] and conv.config["MODEL.SWIN.WINDOW_SIZE"] == 4
    path = str(tmp_path / "backbone.pth")
    save_detectron2_checkpoint(conv.state_dict, path)
    torch.manual_seed(1)
    model = model_of("configs/dino_swint_4scale.yaml", conv.opts() + ["MODEL.DINO.NUM_QUERIES", 20])
    check_against_model(conv.state_dict, model, backbone_only=True)
    DetectionCheckpointer(model).load(path)
    for k, v in conv.state_dict.items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("scale", [4, 5])
def test_detrex_swinl_converts_to_the_swin_configs(scale):
    """detrex's Swin-L 384 DINO (Detectron2's SwinTransformer: the names of this project's backbone)."""
    src = with_buffers(random_checkpoint(f"detrex_dino_swinl_{scale}scale"))
    conv = convert_state_dict(src, "detrex")
    assert conv.base_config == f"configs/dino_swinl_{scale}scale.yaml"
    assert conv.config["MODEL.SWIN.WINDOW_SIZE"] == 12 and conv.config["MODEL.DINO.PE_OFFSET"] == -0.5
    assert any("24 Swin relative_position_index" in n for n in conv.notes)
    check_against_model(conv.state_dict, model_of(conv.base_config, conv.opts(), "meta"))
    for key in (
        "backbone.layers.2.blocks.17.attn.qkv.weight",
        "backbone.norm3.bias",
        "backbone.patch_embed.proj.weight",
    ):
        assert torch.equal(conv.state_dict[key], src[key]), key
