"""Checkpoint conversion (official DINO and detrex -> DinoDetr): key mapping, class remapping,
strict loading into the model, and every failure naming its tensor.

Source checkpoints are random tensors with the names and shapes of the real models, read
from the manifests in ``tests/manifests`` (generated from the two code bases)."""

import argparse
import json
import os
import re

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from dino_detr import add_dino_config
from dino_detr.checkpoint import (
    check_against_model,
    coco_category_ids,
    convert_state_dict,
    load_source_state_dict,
    save_detectron2_checkpoint,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFESTS = os.path.join(REPO, "tests", "manifests")
UNUSED_COCO_IDS = {0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83}


def manifest(name):
    with open(os.path.join(MANIFESTS, name + ".json")) as f:
        return json.load(f)


def random_checkpoint(name, seed=0):
    """Random tensors with the manifest's names and shapes; tensors that are one module in the
    source model (shared heads, ``transformer.decoder.*_embed`` aliases) are made equal."""
    g = torch.Generator().manual_seed(seed)
    m = manifest(name)
    sd = {k: torch.randn(shape, generator=g) for k, shape in m["tensors"]}
    for key in sd:
        alias = re.fullmatch(r"transformer\.decoder\.((class|bbox)_embed\.(\d+)\..*)", key)
        if m["source"] == "official":
            # one class head and one box head shared by all decoder layers
            shared = re.fullmatch(r"(?:transformer\.decoder\.)?(class|bbox)_embed\.\d+\.(.*)", key)
            if shared:
                sd[key] = sd[f"{shared.group(1)}_embed.0.{shared.group(2)}"]
        elif alias:
            sd[key] = sd[alias.group(1)]
    return sd


_MODELS = {}


def base_cfg(scale):
    cfg = get_cfg()
    add_dino_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", f"dino_r50_{scale}scale.yaml"))
    return cfg


def dino_model(scale, opts):
    """DinoDetr of configs/dino_r50_{scale}scale.yaml + opts (cached: building takes seconds)."""
    key = (scale, tuple(opts))
    if key not in _MODELS:
        cfg = base_cfg(scale)
        cfg.merge_from_list(list(opts))
        cfg.MODEL.DEVICE = "cpu"
        _MODELS[key] = build_model(cfg).eval()
    return _MODELS[key]


def load_strictly(state_dict, model, tmp_path):
    """Writes ``state_dict`` as a checkpoint, loads it into ``model`` with DetectionCheckpointer and checks
    that every model tensor came from it; returns the model's state dict."""
    path = str(tmp_path / "converted.pth")
    save_detectron2_checkpoint(state_dict, path)
    DetectionCheckpointer(model).load(path)
    model_sd = model.state_dict()
    assert set(model_sd) == set(state_dict)
    for k, v in model_sd.items():
        assert torch.equal(v, state_dict[k]), k
    return model_sd


def strict_load(conversion, scale, tmp_path):
    """The DINO model of ``scale`` levels, checked to fit the conversion, with its weights loaded strictly."""
    model = dino_model(scale, conversion.opts())
    check_against_model(conversion.state_dict, model)
    load_strictly(conversion.state_dict, model, tmp_path)
    return model


# ----------------------------------------------------------------------------- mapping


@pytest.mark.parametrize("scale", [4, 5])
@pytest.mark.parametrize("classes", ["coco80", "source"])
def test_official_converts_and_loads_strictly(scale, classes, tmp_path):
    src = random_checkpoint(f"official_dino_r50_{scale}scale")
    conv = convert_state_dict(src, "official", classes)
    num_classes = 80 if classes == "coco80" else 91
    assert conv.config["MODEL.DINO.NUM_CLASSES"] == num_classes
    assert conv.config["MODEL.DINO.NUM_FEATURE_LEVELS"] == scale
    assert conv.config["MODEL.DINO.DEC_PRED_CLASS_EMBED_SHARE"] is True
    assert conv.base_config == f"configs/dino_r50_{scale}scale.yaml"
    strict_load(conv, scale, tmp_path)
    # 6 aliases transformer.decoder.class_embed.i (weight, bias) are checked, not copied
    assert len(conv.state_dict) == len(src) - 12


@pytest.mark.parametrize("scale", [4, 5])
def test_detrex_converts_and_loads_strictly(scale, tmp_path):
    src = random_checkpoint(f"detrex_dino_r50_{scale}scale")
    conv = convert_state_dict(src, "detrex")
    assert conv.config["MODEL.DINO.NUM_CLASSES"] == 80
    assert conv.config["MODEL.DINO.DEC_PRED_CLASS_EMBED_SHARE"] is False  # detrex: one head per layer
    assert conv.config["MODEL.DINO.DEC_PRED_BBOX_EMBED_SHARE"] is False
    assert conv.config["MODEL.DINO.PE_TEMPERATURE_H"] == 10000
    assert conv.config["MODEL.DINO.PE_OFFSET"] == -0.5  # detrex's PositionEmbeddingSine(offset=-0.5)
    strict_load(conv, scale, tmp_path)


def test_official_key_mapping_values():
    src = random_checkpoint("official_dino_r50_4scale")
    out = convert_state_dict(src, "official", "source").state_dict
    pairs = {
        "backbone.0.body.conv1.weight": "backbone.stem.conv1.weight",
        "backbone.0.body.bn1.running_var": "backbone.stem.conv1.norm.running_var",
        "backbone.0.body.layer1.0.downsample.0.weight": "backbone.res2.0.shortcut.weight",
        "backbone.0.body.layer1.0.downsample.1.bias": "backbone.res2.0.shortcut.norm.bias",
        "backbone.0.body.layer3.5.bn2.running_mean": "backbone.res4.5.conv2.norm.running_mean",
        "backbone.0.body.layer4.2.conv3.weight": "backbone.res5.2.conv3.weight",
        "input_proj.3.0.weight": "input_proj.3.0.weight",
        "transformer.decoder.layers.5.self_attn.in_proj_weight": "transformer.decoder.layers.5.self_attn.in_proj_weight",
        "transformer.enc_out_bbox_embed.layers.2.bias": "transformer.enc_out_bbox_embed.layers.2.bias",
        "label_enc.weight": "label_enc.weight",
    }
    for s, o in pairs.items():
        assert torch.equal(out[o], src[s]), (s, o)
    # nothing dropped: every source tensor but the aliases is somewhere in the output
    for k, v in src.items():
        if not k.startswith("transformer.decoder.class_embed."):
            assert any(torch.equal(v, t) for t in out.values() if t.shape == v.shape), k


def test_detrex_key_mapping_values():
    src = random_checkpoint("detrex_dino_r50_4scale")
    out = convert_state_dict(src, "detrex").state_dict
    pairs = {
        "backbone.res3.1.conv2.norm.weight": "backbone.res3.1.conv2.norm.weight",
        "neck.convs.1.conv.weight": "input_proj.1.0.weight",
        "neck.convs.2.norm.bias": "input_proj.2.1.bias",
        "neck.extra_convs.0.conv.weight": "input_proj.3.0.weight",
        "neck.extra_convs.0.norm.weight": "input_proj.3.1.weight",
        "transformer.level_embeds": "transformer.level_embed",
        "transformer.encoder.layers.2.attentions.0.value_proj.weight": "transformer.encoder.layers.2.self_attn.value_proj.weight",
        "transformer.encoder.layers.2.norms.1.bias": "transformer.encoder.layers.2.norm2.bias",
        "transformer.encoder.layers.4.ffns.0.layers.0.0.weight": "transformer.encoder.layers.4.linear1.weight",
        "transformer.decoder.layers.1.attentions.0.attn.out_proj.weight": "transformer.decoder.layers.1.self_attn.out_proj.weight",
        "transformer.decoder.layers.1.attentions.1.sampling_offsets.bias": "transformer.decoder.layers.1.cross_attn.sampling_offsets.bias",
        # detrex decoder order: self_attn, norm, cross_attn, norm, ffn, norm
        "transformer.decoder.layers.3.norms.0.weight": "transformer.decoder.layers.3.norm2.weight",
        "transformer.decoder.layers.3.norms.1.weight": "transformer.decoder.layers.3.norm1.weight",
        "transformer.decoder.layers.3.norms.2.weight": "transformer.decoder.layers.3.norm3.weight",
        "transformer.decoder.layers.0.ffns.0.layers.1.bias": "transformer.decoder.layers.0.linear2.bias",
        "class_embed.3.weight": "class_embed.3.weight",
        "class_embed.6.bias": "transformer.enc_out_class_embed.bias",
        "bbox_embed.6.layers.0.weight": "transformer.enc_out_bbox_embed.layers.0.weight",
        "bbox_embed.4.layers.2.bias": "transformer.decoder.bbox_embed.4.layers.2.bias",
    }
    for s, o in pairs.items():
        assert torch.equal(out[o], src[s]), (s, o)
    # detrex has no spare label row: one zero row is appended (never indexed by the model)
    assert torch.equal(out["label_enc.weight"][:80], src["label_enc.weight"])
    assert out["label_enc.weight"].shape[0] == 81 and not out["label_enc.weight"][80].any()


# ----------------------------------------------------------------------------- classes


def test_coco_category_ids():
    ids = coco_category_ids()
    assert len(ids) == 80 and ids == sorted(ids)
    assert set(range(91)) - set(ids) == UNUSED_COCO_IDS
    assert ids[0] == 1 and ids[11] == 13 and ids[-1] == 90  # person, stop sign, toothbrush


def test_official_class_rows_remapped_value_by_value():
    src = random_checkpoint("official_dino_r50_4scale")
    out = convert_state_dict(src, "official", "coco80").state_dict
    ids = coco_category_ids()
    names = [f"class_embed.{i}.{p}" for i in range(6) for p in ("weight", "bias")]
    names += ["transformer.enc_out_class_embed.weight", "transformer.enc_out_class_embed.bias"]
    for name in names:
        assert out[name].shape[0] == 80, name
        for c, cat in enumerate(ids):
            assert torch.equal(out[name][c], src[name][cat]), (name, c)
    label = out["label_enc.weight"]
    assert label.shape == (81, 256)
    for c, cat in enumerate(ids):
        assert torch.equal(label[c], src["label_enc.weight"][cat])
    assert torch.equal(label[80], src["label_enc.weight"][91])  # the spare row stays last
    # untouched tensors are not remapped
    assert torch.equal(out["bbox_embed.0.layers.2.weight"], src["bbox_embed.0.layers.2.weight"])


def test_keep_91_classes_unchanged():
    src = random_checkpoint("official_dino_r50_4scale")
    conv = convert_state_dict(src, "official", "source")
    assert torch.equal(conv.state_dict["class_embed.0.weight"], src["class_embed.0.weight"])
    assert conv.config["MODEL.DINO.DN_LABELBOOK_SIZE"] == 0  # = NUM_CLASSES
    assert conv.state_dict["label_enc.weight"].shape == (92, 256)
    assert any("COCO ids" in n for n in conv.notes)


# ----------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    "extra", ["transformer.reference_points.weight", "query_embed.weight", "module.class_embed.0.weight", "fc.weight"]
)
def test_unknown_tensor_fails_naming_it(extra):
    src = random_checkpoint("official_dino_r50_4scale")
    src[extra] = torch.zeros(3)
    with pytest.raises(KeyError, match=re.escape(extra)):
        convert_state_dict(src, "official")


def test_other_models_checkpoint_fails():
    import torchvision

    resnet = torchvision.models.resnet50().state_dict()  # a classification model
    with pytest.raises(KeyError, match="conv1.weight"):
        convert_state_dict(resnet, "official")
    official = random_checkpoint("official_dino_r50_4scale")
    with pytest.raises(ValueError, match="backbone.0.body.*source 'official'"):  # wrong --source
        convert_state_dict(official, "detrex")
    detrex = random_checkpoint("detrex_dino_r50_4scale")
    with pytest.raises(ValueError, match="neck.*source 'detrex'"):
        convert_state_dict(detrex, "official")


def test_class_row_shape_mismatch_fails_naming_it():
    src = random_checkpoint("official_dino_r50_4scale")
    src["class_embed.3.bias"] = torch.zeros(90)
    with pytest.raises(ValueError, match=r"class_embed\.3\.bias"):
        convert_state_dict(src, "official")
    src = random_checkpoint("official_dino_r50_4scale")
    src["label_enc.weight"] = torch.zeros(91, 256)
    with pytest.raises(ValueError, match="label_enc.weight"):
        convert_state_dict(src, "official")


def test_remap_of_non_coco_rows_fails_naming_it():
    src = random_checkpoint("official_dino_r50_4scale")
    for k in list(src):
        if re.match(r"(transformer\.decoder\.)?class_embed\.\d+\.|transformer\.enc_out_class_embed\.", k):
            src[k] = src[k][:20].clone()
    src["label_enc.weight"] = src["label_enc.weight"][:21].clone()
    with pytest.raises(ValueError, match=r"class_embed\.weight: expected 91 rows"):
        convert_state_dict(src, "official", "coco80")
    assert convert_state_dict(src, "official", "source").config["MODEL.DINO.NUM_CLASSES"] == 20


def test_broken_alias_fails_naming_it():
    src = random_checkpoint("official_dino_r50_4scale")
    src["transformer.decoder.class_embed.2.weight"] = src["class_embed.2.weight"] + 1
    with pytest.raises(ValueError, match=r"transformer\.decoder\.class_embed\.2\.weight"):
        convert_state_dict(src, "official")


def test_shape_mismatch_against_model_fails_naming_it(tmp_path):
    conv = convert_state_dict(random_checkpoint("official_dino_r50_4scale"), "official")
    conv.state_dict["transformer.encoder.layers.0.linear1.weight"] = torch.zeros(1024, 256)
    with pytest.raises(ValueError, match=r"transformer\.encoder\.layers\.0\.linear1\.weight"):
        check_against_model(conv.state_dict, dino_model(4, ["MODEL.DINO.NUM_CLASSES", "80"]))
    del conv.state_dict["transformer.tgt_embed.weight"]
    with pytest.raises(KeyError, match=r"transformer\.tgt_embed\.weight"):
        check_against_model(conv.state_dict, dino_model(4, ["MODEL.DINO.NUM_CLASSES", "80"]))


def test_missing_tensor_fails_naming_it():
    src = random_checkpoint("detrex_dino_r50_4scale")
    del src["label_enc.weight"]
    with pytest.raises(KeyError, match="label_enc.weight"):
        convert_state_dict(src, "detrex")


def test_bad_source_and_layout():
    src = random_checkpoint("official_dino_r50_4scale")
    with pytest.raises(ValueError, match="source"):
        convert_state_dict(src, "mmdet")
    with pytest.raises(ValueError, match="class layout"):
        convert_state_dict(src, "official", "coco91")


# ----------------------------------------------------------------------------- loading


class _Opaque:
    """Not an allowed global of the safe unpickler."""


def test_loading_is_weights_only_by_default(tmp_path, monkeypatch):
    weights = {"label_enc.weight": torch.ones(2, 2)}
    ok = tmp_path / "official_style.pth"
    torch.save({"model": weights, "args": argparse.Namespace(lr=1e-4), "epoch": 11}, ok)
    assert torch.equal(load_source_state_dict(str(ok))["label_enc.weight"], weights["label_enc.weight"])
    unsafe = tmp_path / "pickle.pth"
    torch.save({"model": weights, "extra": _Opaque()}, unsafe)
    with pytest.raises(RuntimeError, match="DINO_DETR_TRUSTED_WEIGHTS=.*pickle.pth"):
        load_source_state_dict(str(unsafe))
    monkeypatch.setenv("DINO_DETR_TRUSTED_WEIGHTS", str(unsafe))
    assert "label_enc.weight" in load_source_state_dict(str(unsafe))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_source_state_dict(str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"label_enc.weight": [1.0]}}, bad)
    with pytest.raises(ValueError, match="label_enc.weight"):
        load_source_state_dict(str(bad))


def test_cli_end_to_end(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", os.path.join(REPO, "tools", "convert_checkpoint.py")
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    src, out = tmp_path / "official.pth", tmp_path / "ours.pth"
    torch.save(
        {"model": random_checkpoint("official_dino_r50_5scale"), "args": argparse.Namespace(num_classes=91)}, src
    )
    cli.main(["--source", "official", str(src), str(out), "--classes", "source"])
    printed = capsys.readouterr().out
    assert "strict load into the model verified" in printed
    assert "configs/dino_r50_5scale.yaml" in printed and "MODEL.DINO.NUM_CLASSES 91" in printed
    loaded = torch.load(str(out), weights_only=True)
    assert loaded["model"]["class_embed.0.weight"].shape == (91, 256)


# ----------------------------------------------------------------------------- mmdetection


def test_mmdet_converts_and_loads_strictly(tmp_path):
    src = random_checkpoint("mmdet_dino_r50_4scale")
    conv = convert_state_dict(src, "mmdet")
    assert conv.base_config == "configs/dino_r50_4scale.yaml"
    assert conv.config["MODEL.DINO.DEC_PRED_CLASS_EMBED_SHARE"] is False
    assert (conv.config["MODEL.DINO.PE_TEMPERATURE_H"], conv.config["MODEL.DINO.PE_OFFSET"]) == (20, 0.0)
    assert conv.config["MODEL.DINO.BOX_PREDICTION_EPS"] == 1e-5  # mmdetection's head; official / detrex 1e-3
    strict_load(conv, 4, tmp_path)
    counters = [k for k in src if k.endswith("num_batches_tracked")]
    # counters dropped; 4 zero neck biases added; this model's decoder aliases of the 6 box heads (6 tensors each)
    assert len(conv.state_dict) == len(src) - len(counters) + 4 + 36
    pairs = {
        "backbone.conv1.weight": "backbone.stem.conv1.weight",
        "backbone.layer2.0.downsample.1.running_var": "backbone.res3.0.shortcut.norm.running_var",
        "backbone.layer3.4.bn3.bias": "backbone.res4.4.conv3.norm.bias",
        "neck.convs.2.conv.weight": "input_proj.2.0.weight",
        "neck.convs.0.gn.bias": "input_proj.0.1.bias",
        "neck.extra_convs.0.gn.weight": "input_proj.3.1.weight",
        "level_embed": "transformer.level_embed",
        "query_embedding.weight": "transformer.tgt_embed.weight",
        "memory_trans_fc.weight": "transformer.enc_output.weight",
        "memory_trans_norm.bias": "transformer.enc_output_norm.bias",
        "encoder.layers.3.self_attn.sampling_offsets.weight": "transformer.encoder.layers.3.self_attn.sampling_offsets.weight",
        "encoder.layers.3.norms.1.weight": "transformer.encoder.layers.3.norm2.weight",
        "encoder.layers.5.ffn.layers.0.0.weight": "transformer.encoder.layers.5.linear1.weight",
        "decoder.layers.2.self_attn.attn.in_proj_weight": "transformer.decoder.layers.2.self_attn.in_proj_weight",
        "decoder.layers.2.norms.0.bias": "transformer.decoder.layers.2.norm2.bias",
        "decoder.layers.2.norms.1.bias": "transformer.decoder.layers.2.norm1.bias",
        "decoder.layers.2.ffn.layers.1.weight": "transformer.decoder.layers.2.linear2.weight",
        "decoder.ref_point_head.layers.1.bias": "transformer.decoder.ref_point_head.layers.1.bias",
        "decoder.norm.weight": "transformer.decoder.norm.weight",
        "bbox_head.cls_branches.4.weight": "class_embed.4.weight",
        "bbox_head.cls_branches.6.bias": "transformer.enc_out_class_embed.bias",
        "bbox_head.reg_branches.5.4.weight": "bbox_embed.5.layers.2.weight",
        "bbox_head.reg_branches.6.2.bias": "transformer.enc_out_bbox_embed.layers.1.bias",
    }
    for s, o in pairs.items():
        assert torch.equal(conv.state_dict[o], src[s]), (s, o)
    assert not conv.state_dict["input_proj.1.0.bias"].any()
    label = conv.state_dict["label_enc.weight"]
    assert torch.equal(label[:80], src["dn_query_generator.label_embedding.weight"]) and not label[80].any()


def test_mmdet_source_is_recognised_and_checked(tmp_path, capsys):
    from dino_detr.checkpoint import layout_of, mmdet_source_config

    src = random_checkpoint("mmdet_dino_r50_4scale")
    assert layout_of(src) == "mmdet" and layout_of(random_checkpoint("detrex_dino_r50_4scale")) == "detrex"
    with pytest.raises(ValueError, match="bbox_head.*source 'mmdet'"):
        convert_state_dict(src, "detrex")
    improved = "model = dict(positional_encoding=dict(num_feats=128, normalize=True, offset=-0.5, temperature=10000))"
    assert mmdet_source_config({"cfg": improved}) == {
        "MODEL.DINO.PE_TEMPERATURE_H": 10000,
        "MODEL.DINO.PE_TEMPERATURE_W": 10000,
        "MODEL.DINO.PE_OFFSET": -0.5,
    }
    assert mmdet_source_config({}) == {} and mmdet_source_config(None) == {}
    # the CLI: mmdetection's {"meta", "state_dict"} file, layout recognised without --source
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", os.path.join(REPO, "tools", "convert_checkpoint.py")
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    path, out = tmp_path / "dino-4scale_r50_improved.pth", tmp_path / "ours.pth"
    torch.save({"meta": {"cfg": improved}, "state_dict": src}, path)
    cli.main([str(path), str(out), "--no-verify"])
    printed = capsys.readouterr().out
    assert "MODEL.DINO.PE_TEMPERATURE_H 10000 " in printed and "MODEL.DINO.PE_OFFSET -0.5" in printed
    assert "DEC_PRED_CLASS_EMBED_SHARE False" in printed
