"""Conversion of the official DINO, detrex and mmdetection Swin-L checkpoints (4- and 5-scale) and of the
ImageNet-22k Swin-L classifier: every tensor placed or explained, buffers checked, mmdetection's
patch-merging channel order, strict loading, failures named.

Source checkpoints are random tensors with the names and shapes of the real models, read from the
manifests in ``tests/manifests`` (generated from IDEA-Research/DINO, detrex, mmdetection and
microsoft/Swin-Transformer); derived buffers get the values those models compute."""

import argparse
import importlib.util
import os
import re

import pytest
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from test_convert_checkpoint import load_strictly, manifest, random_checkpoint
from torch import nn

from dino_detr import get_dino_cfg
from dino_detr.checkpoint import check_against_model, convert_state_dict
from dino_detr.modeling.swin import PatchMerging, relative_position_index, shifted_window_mask

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
    model_sd = load_strictly(conv.state_dict, model_of(conv.base_config, conv.opts()), tmp_path)
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


# ----------------------------------------------------------------------------- mmdetection


@pytest.fixture(scope="module")
def mmdet_swinl():
    """mmdetection's dino-5scale_swin-l (random tensors, its relative_position_index buffers) and its conversion."""
    src = with_buffers(random_checkpoint("mmdet_dino_swinl_5scale"))
    return src, convert_state_dict(src, "mmdet")


def test_mmdet_swinl_5scale_converts_and_loads_strictly(mmdet_swinl, tmp_path):
    src, conv = mmdet_swinl
    assert conv.base_config == "configs/dino_swinl_5scale.yaml"
    assert conv.config["MODEL.DINO.IN_FEATURES"] == ["swin0", "swin1", "swin2", "swin3"]
    assert conv.config["MODEL.SWIN.DEPTHS"] == [2, 2, 18, 2] and conv.config["MODEL.SWIN.WINDOW_SIZE"] == 12
    assert conv.config["MODEL.DINO.DEC_PRED_BBOX_EMBED_SHARE"] is False
    assert (conv.config["MODEL.DINO.PE_TEMPERATURE_H"], conv.config["MODEL.DINO.PE_OFFSET"]) == (20, 0.0)
    # 24 relative_position_index buffers checked, not copied; 5 zero neck biases added; this model's
    # decoder aliases of the 6 box heads (6 tensors each)
    assert len(conv.state_dict) == len(src) - 24 + 5 + 36
    assert any("9 Swin patch-merging tensors" in n for n in conv.notes)
    model_sd = load_strictly(conv.state_dict, model_of(conv.base_config, conv.opts()), tmp_path)
    pairs = {
        "backbone.patch_embed.projection.weight": "backbone.patch_embed.proj.weight",
        "backbone.patch_embed.norm.bias": "backbone.patch_embed.norm.bias",
        "backbone.stages.2.blocks.17.attn.w_msa.relative_position_bias_table": "backbone.layers.2.blocks.17.attn.relative_position_bias_table",
        "backbone.stages.2.blocks.5.attn.w_msa.qkv.weight": "backbone.layers.2.blocks.5.attn.qkv.weight",
        "backbone.stages.3.blocks.1.attn.w_msa.proj.bias": "backbone.layers.3.blocks.1.attn.proj.bias",
        "backbone.stages.1.blocks.1.norm2.weight": "backbone.layers.1.blocks.1.norm2.weight",
        "backbone.stages.0.blocks.0.ffn.layers.0.0.weight": "backbone.layers.0.blocks.0.mlp.fc1.weight",
        "backbone.stages.3.blocks.0.ffn.layers.1.bias": "backbone.layers.3.blocks.0.mlp.fc2.bias",
        "backbone.norm0.weight": "backbone.norm0.weight",
        "neck.convs.0.conv.weight": "input_proj.0.0.weight",
        "neck.extra_convs.0.conv.weight": "input_proj.4.0.weight",
        "neck.extra_convs.0.gn.bias": "input_proj.4.1.bias",
        "bbox_head.cls_branches.6.weight": "transformer.enc_out_class_embed.weight",
    }
    for s, o in pairs.items():
        assert torch.equal(model_sd[o], src[s]), (s, o)


def _mmdet_patch_merging(x, weight, norm_weight, norm_bias):
    """mmdetection's PatchMerging, from its definition: (B, H, W, C) zero-padded at the bottom / right to even
    sides, ``nn.Unfold(kernel_size=2, stride=2)`` on (B, C, H, W), LayerNorm over the 4C samples, bias-free
    Linear. Returns (B, ceil(H/2), ceil(W/2), 2C)."""
    b, h, w, c = x.shape
    x = F.pad(x.permute(0, 3, 1, 2), (0, w % 2, 0, h % 2))
    samples = nn.Unfold(kernel_size=2, stride=2)(x).transpose(1, 2)  # (B, L, 4C)
    out = F.linear(F.layer_norm(samples, (4 * c,), norm_weight, norm_bias), weight)
    return out.view(b, -(-h // 2), -(-w // 2), 2 * c)


@pytest.mark.parametrize("stage", [0, 2])
def test_mmdet_patch_merging_channel_order(mmdet_swinl, stage):
    """The converted patch merging of a stage computes mmdetection's (the weights are random, so any other
    channel order differs); loaded without the conversion's permutation it does not."""
    src, conv = mmdet_swinl
    theirs = [src[f"backbone.stages.{stage}.downsample.{n}"] for n in ("reduction.weight", "norm.weight", "norm.bias")]
    c = theirs[0].shape[1] // 4
    x = torch.randn(2, 5, 8, c, generator=torch.Generator().manual_seed(stage))  # odd height: padded
    expected = _mmdet_patch_merging(x, *theirs)
    ours = PatchMerging(c)
    prefix = f"backbone.layers.{stage}.downsample."
    ours.load_state_dict({k[len(prefix) :]: v for k, v in conv.state_dict.items() if k.startswith(prefix)})
    with torch.no_grad():
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-4)
        ours.load_state_dict(dict(zip(("reduction.weight", "norm.weight", "norm.bias"), theirs)))
        assert (ours(x) - expected).abs().max() > 0.1


def test_mmdet_swin_is_recognised_and_buffers_checked(mmdet_swinl):
    from dino_detr.checkpoint import layout_of

    src, _ = mmdet_swinl
    assert layout_of(src) == "mmdet"
    key = "backbone.stages.3.blocks.1.attn.w_msa.relative_position_index"
    with pytest.raises(ValueError, match=re.escape(key)):
        convert_state_dict(dict(src, **{key: src[key].flip(1)}), "mmdet")
    key = "backbone.stages.1.downsample.reduction.weight"
    with pytest.raises(ValueError, match=re.escape("backbone.layers.1.downsample.reduction.weight")):
        convert_state_dict(dict(src, **{key: src[key][:, :-2]}), "mmdet")
