"""Conversion of official DINO / detrex / mmdetection DINO checkpoints into this project's ``DinoDetr``.

Every source tensor is renamed (``rename.py``), aliases (the same tensor stored twice) are
checked equal, classification rows are remapped from the 91 COCO category ids to Detectron2's
80 contiguous classes when asked (``coco_classes.py``), and the config that the result needs is
read off the tensors. Nothing is dropped without a check; anything unexpected raises an error
that names the tensor.
"""

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from .coco_classes import COCO_NUM_IDS, rows_91_to_80
from .rename import detrex_rules, mmdet_rules, official_rules, rename
from .rename import layer_count as _layer_count
from .swin import (
    check_swin_buffer,
    convert_swin_classifier,
    infer_swin_config,
    is_swin_buffer,
    reorder_patch_merging,
)

__all__ = ["SOURCES", "CLASS_LAYOUTS", "Conversion", "convert_state_dict", "check_against_model", "source_of"]

#: ``swin-imagenet``: an ImageNet Swin classifier (microsoft/Swin-Transformer) -> backbone only.
SOURCES = ("official", "detrex", "mmdet", "swin-imagenet")
#: ``coco80``: Detectron2's contiguous COCO classes (what ``coco_2017_val`` evaluation needs);
#: ``source``: the classifier rows as stored (official: 91 COCO category ids).
CLASS_LAYOUTS = ("coco80", "source")

_CLASS_ROWS = re.compile(r"(class_embed\.\d+|transformer\.enc_out_class_embed)\.(weight|bias)\Z")
_DECODER_ALIAS = "transformer.decoder."
_BACKBONE_LEVEL = {256: "res2", 512: "res3", 1024: "res4", 2048: "res5"}
_RESNET_DEPTH = {6: 50, 23: 101}  # blocks in res4


@dataclass
class Conversion:
    """Result of a conversion.

    Attributes:
        state_dict: tensors under this project's names (Detectron2 ``{"model": ...}`` payload).
        config: config keys (``"MODEL.DINO.NUM_CLASSES"`` ...) the converted model needs.
        base_config: the repository config file to start from.
        notes: what the conversion did beyond renaming (remaps, added rows, checked aliases).
        backbone_only: only ``backbone.*`` tensors (ImageNet weights to train from).
    """

    state_dict: Dict[str, torch.Tensor]
    config: Dict[str, object]
    base_config: str
    notes: List[str] = field(default_factory=list)
    backbone_only: bool = False

    def opts(self) -> List[str]:
        """``config`` as a Detectron2 ``cfg.merge_from_list`` list."""
        return [x for k, v in self.config.items() for x in (k, str(v).replace(" ", ""))]


# Tensor names only one of the sources has (checked in this order: mmdetection also has a ``neck``).
_TELLTALE = {
    "official": ("backbone.0.body.", "backbone.0.patch_embed."),
    "mmdet": ("bbox_head.", "dn_query_generator."),
    "detrex": ("neck.",),
}


def source_of(names) -> Optional[tuple]:
    """``(source, telltale tensor name)`` of the first source in :data:`SOURCES` whose own tensor
    names occur among ``names``; ``None`` when none does (this project's names, or another model's)."""
    for source, prefixes in _TELLTALE.items():
        hit = next((k for k in names if k.startswith(prefixes)), None)
        if hit is not None:
            return source, hit
    return None


def _check_source(source: str, names) -> None:
    found = source_of(names)
    if found is not None and found[0] != source:
        other, hit = found
        raise ValueError(f"{hit!r} is a tensor of a {other} checkpoint, not a {source} one: use source {other!r}")


def _rules_for(source: str, names) -> list:
    if source == "official":
        return official_rules()
    if source == "mmdet":
        return mmdet_rules(_layer_count(names, "neck.convs."), _layer_count(names, "decoder.layers."))
    return detrex_rules(_layer_count(names, "neck.convs."), _layer_count(names, "transformer.decoder.layers."))


def _add_missing_conv_bias(out: Dict[str, torch.Tensor], notes: List[str]) -> None:
    """mmdetection's ``ChannelMapper`` convolutions have no bias (a GroupNorm follows); this model's
    input projections do: a zero bias computes the same."""
    added = 0
    for key in [k for k in out if re.fullmatch(r"input_proj\.\d+\.0\.weight", k)]:
        bias = key[: -len("weight")] + "bias"
        if bias not in out:
            out[bias] = out[key].new_zeros(out[key].shape[0])
            added += 1
    if added:
        notes.append(f"input_proj: {added} zero convolution biases added (mmdetection's neck convolutions have none)")


def _reorder_patch_merging(out: Dict[str, torch.Tensor], notes: List[str]) -> None:
    """mmdetection's Swin merges patches with ``nn.Unfold``: another order of the 4C channels."""
    permuted = reorder_patch_merging(out)
    if permuted:
        notes.append(
            f"{permuted} Swin patch-merging tensors: input channels permuted from mmdetection's nn.Unfold order "
            "to the x0..x3 concatenation of this model"
        )


def _check_alias(source_sd, alias: str, source: str) -> str:
    """An alias ``transformer.decoder.X`` must equal ``X`` of the same checkpoint."""
    primary = alias[len(_DECODER_ALIAS) :]
    if primary not in source_sd:
        raise KeyError(f"{source} checkpoint: {alias!r} is an alias of {primary!r}, which is missing")
    if not torch.equal(source_sd[alias], source_sd[primary]):
        raise ValueError(f"{source} checkpoint: {alias!r} differs from {primary!r}, which it should alias")
    return primary


def _link_decoder_box_heads(out: Dict[str, torch.Tensor], source: str) -> None:
    """This model stores each decoder box head twice (``bbox_embed.i`` and
    ``transformer.decoder.bbox_embed.i``, one module): both must hold the same tensor."""
    for key in [k for k in out if k.startswith("bbox_embed.")]:
        alias = _DECODER_ALIAS + key
        if alias not in out:
            out[alias] = out[key]
        elif not torch.equal(out[alias], out[key]):
            raise ValueError(f"{source} checkpoint: decoder box head {alias!r} differs from {key!r}")
    orphans = [k for k in out if k.startswith(_DECODER_ALIAS + "bbox_embed.") and k[len(_DECODER_ALIAS) :] not in out]
    if orphans:
        raise KeyError(f"{source} checkpoint: {orphans[0]!r} has no matching {orphans[0][len(_DECODER_ALIAS) :]!r}")


def _convert_classes(out: Dict[str, torch.Tensor], source: str, layout: str, notes: List[str]) -> int:
    """Checks the class rows of every classifier and ``label_enc``; remaps them for ``coco80``.
    Returns the number of classes of the converted model."""
    class_keys = [k for k in out if _CLASS_ROWS.match(k)]
    if "label_enc.weight" not in out or not class_keys:
        missing = "label_enc.weight" if "label_enc.weight" not in out else "class_embed.*"
        raise KeyError(f"{source} checkpoint: {missing} is missing: not a DINO checkpoint")
    rows = {k: out[k].shape[0] for k in class_keys}
    num_classes = rows[class_keys[0]]
    for k, r in rows.items():
        if r != num_classes:
            raise ValueError(f"{source} checkpoint: {k} has {r} class rows, {class_keys[0]} has {num_classes}")
    label_rows = out["label_enc.weight"].shape[0]
    # The official label book has one spare row after the classes; detrex has none, and this
    # model has the official layout: its spare row is never indexed (noised labels < classes).
    expected = num_classes + (1 if source == "official" else 0)
    if label_rows != expected:
        raise ValueError(
            f"{source} checkpoint: label_enc.weight has {label_rows} rows, expected {expected} "
            f"for {num_classes} classes"
        )
    if source != "official":
        enc = out["label_enc.weight"]
        out["label_enc.weight"] = torch.cat([enc, enc.new_zeros(1, enc.shape[1])])
        notes.append("label_enc: appended the spare row of the official layout (zeros; never indexed)")
    if layout == "source":
        return num_classes
    if source == "official":
        for k in class_keys:
            out[k] = rows_91_to_80(k, out[k])
        out["label_enc.weight"] = rows_91_to_80("label_enc.weight", out["label_enc.weight"], extra_rows=1)
        notes.append(
            f"class rows: 91 COCO category ids -> 80 Detectron2 classes in {len(class_keys)} "
            "classifier tensors and label_enc (spare row kept)"
        )
        return 80
    if num_classes != 80:
        raise ValueError(
            f"{source} checkpoint: {class_keys[0]} has {num_classes} classes; COCO layout needs 80 "
            "(use the 'source' class layout for other data sets)"
        )
    notes.append(f"class rows: {source} already uses the 80 contiguous COCO classes of Detectron2")
    return 80


def _heads_shared(out: Dict[str, torch.Tensor], prefix: str, num_layers: int) -> bool:
    first = prefix + ".0."
    names = [k[len(first) :] for k in out if k.startswith(first)]
    return all(
        torch.equal(out[f"{prefix}.0.{n}"], out[f"{prefix}.{i}.{n}"]) for i in range(1, num_layers) for n in names
    )


def _infer_config(out: Dict[str, torch.Tensor], source: str, num_classes: int):
    """Config keys and base config file that match the converted tensors."""
    levels = _layer_count(out, "input_proj.")
    in_channels = [
        out[f"input_proj.{lv}.0.weight"].shape[1]
        for lv in range(levels)
        if out[f"input_proj.{lv}.0.weight"].shape[-1] == 1
    ]
    if "backbone.patch_embed.proj.weight" in out:
        config, base = infer_swin_config(out, in_channels, levels)
    else:
        config, base = _infer_resnet_config(out, in_channels, levels)
    dec_layers = _layer_count(out, "transformer.decoder.layers.")
    tgt = out["transformer.tgt_embed.weight"]
    labelbook = out["label_enc.weight"].shape[0] - 1
    config.update(
        {
            "MODEL.DINO.NUM_FEATURE_LEVELS": levels,
            "MODEL.DINO.NUM_CLASSES": num_classes,
            # 0 = NUM_CLASSES (the config's default)
            "MODEL.DINO.DN_LABELBOOK_SIZE": 0 if labelbook == num_classes else labelbook,
            "MODEL.DINO.HIDDEN_DIM": tgt.shape[1],
            "MODEL.DINO.NUM_QUERIES": tgt.shape[0],
            "MODEL.DINO.ENC_LAYERS": _layer_count(out, "transformer.encoder.layers."),
            "MODEL.DINO.DEC_LAYERS": dec_layers,
            "MODEL.DINO.DIM_FEEDFORWARD": out["transformer.encoder.layers.0.linear1.weight"].shape[0],
            "MODEL.DINO.DEC_PRED_CLASS_EMBED_SHARE": _heads_shared(out, "class_embed", dec_layers),
            "MODEL.DINO.DEC_PRED_BBOX_EMBED_SHARE": _heads_shared(out, "bbox_embed", dec_layers),
        }
    )
    temperature, offset = _POSITION_EMBEDDING.get(source, (20, 0.0))
    config.update(
        {
            "MODEL.DINO.PE_TEMPERATURE_H": temperature,
            "MODEL.DINO.PE_TEMPERATURE_W": temperature,
            "MODEL.DINO.PE_OFFSET": offset,
            "MODEL.DINO.BOX_PREDICTION_EPS": _BOX_PREDICTION_EPS.get(source, 1e-3),
        }
    )
    return config, base


# (temperature, offset) of the sine position embedding: detrex's PositionEmbeddingSine(temperature=10000,
# offset=-0.5); mmdetection's base config SinePositionalEncoding(temperature=20, offset=0.0) like the
# official DINO (its "improved" config: 10000 and -0.5, given with ``source_config``).
_POSITION_EMBEDDING = {"detrex": (10000, -0.5), "mmdet": (20, 0.0), "official": (20, 0.0)}
# Floor of the inverse sigmoid in each layer's box prediction: mmdetection's head uses its
# inverse_sigmoid's default 1e-5; the official DINO and detrex 1e-3.
_BOX_PREDICTION_EPS = {"mmdet": 1e-5}


def _infer_resnet_config(out: Dict[str, torch.Tensor], in_channels: List[int], levels: int):
    for level, channels in enumerate(in_channels):
        if channels not in _BACKBONE_LEVEL:
            raise ValueError(f"input_proj.{level}.0.weight: {channels} input channels match no ResNet stage")
    in_feats = [_BACKBONE_LEVEL[c] for c in in_channels]
    res4_blocks = _layer_count(out, "backbone.res4.")
    if res4_blocks not in _RESNET_DEPTH:
        raise ValueError(f"backbone.res4 has {res4_blocks} blocks: not a ResNet-50/101")
    depth = _RESNET_DEPTH[res4_blocks]
    config = {"MODEL.RESNETS.DEPTH": depth, "MODEL.RESNETS.OUT_FEATURES": in_feats, "MODEL.DINO.IN_FEATURES": in_feats}
    name = f"dino_r{depth}_{levels}scale.yaml"
    known = {"dino_r50_4scale.yaml", "dino_r50_5scale.yaml", "dino_r101_4scale.yaml"}
    return config, f"configs/{name if name in known else 'Base-DINO.yaml'}"


def convert_state_dict(
    state_dict: Dict[str, torch.Tensor],
    source: str,
    class_layout: str = "coco80",
    source_config: Optional[Dict[str, object]] = None,
) -> Conversion:
    """Convert the weights of an official (``source="official"``, ResNet or Swin), detrex (ResNet or
    Swin) or mmdetection (``"mmdet"``, ResNet or Swin) DINO checkpoint, or of an ImageNet Swin classifier
    (``"swin-imagenet"``: backbone only).

    Args:
        state_dict: the source model's tensors (name -> tensor).
        source: one of :data:`SOURCES`.
        class_layout: one of :data:`CLASS_LAYOUTS` (DINO checkpoints only).
        source_config: config keys known from outside the tensors (e.g. the position embedding
            read from an mmdetection checkpoint's stored config); they override the inferred ones.
    Raises:
        KeyError / ValueError naming the tensor: unknown names, broken aliases, inconsistent
        class rows, missing parts, another model's checkpoint.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown checkpoint source {source!r}; expected one of {SOURCES}")
    if class_layout not in CLASS_LAYOUTS:
        raise ValueError(f"unknown class layout {class_layout!r}; expected one of {CLASS_LAYOUTS}")
    if source == "swin-imagenet":
        return Conversion(*convert_swin_classifier(state_dict), backbone_only=True)
    _check_source(source, state_dict)
    rules = _rules_for(source, state_dict)
    out: Dict[str, torch.Tensor] = {}
    aliases = buffers = counters = 0
    for key, tensor in state_dict.items():
        if source == "mmdet" and key.endswith(".num_batches_tracked"):
            if tensor.numel() != 1:
                raise ValueError(f"mmdet checkpoint: {key!r} has shape {tuple(tensor.shape)}, not a counter")
            counters += 1
            continue
        if is_swin_buffer(key):
            check_swin_buffer(key, tensor)
            buffers += 1
            continue
        target = rename(key, rules, source)
        if target is None:
            _check_alias(state_dict, key, source)
            aliases += 1
            continue
        if target in out:
            raise KeyError(f"{source} checkpoint: {key!r} maps to {target!r}, which another tensor already filled")
        out[target] = tensor.detach().to("cpu").clone()
    notes = [f"{aliases} alias tensors (transformer.decoder.*_embed = the heads) checked equal and not duplicated"]
    if counters:
        notes.append(f"{counters} BatchNorm num_batches_tracked counters not copied (frozen BatchNorm has none)")
    if source == "mmdet":
        _add_missing_conv_bias(out, notes)
        _reorder_patch_merging(out, notes)
    if buffers:
        notes.append(f"{buffers} Swin relative_position_index buffers checked against the window size, not copied")
    _link_decoder_box_heads(out, source)
    num_classes = _convert_classes(out, source, class_layout, notes)
    config, base = _infer_config(out, source, num_classes)
    config.update(source_config or {})
    if source == "official" and class_layout == "source" and num_classes == COCO_NUM_IDS:
        notes.append(
            "classes kept as 91 COCO category ids: pred_classes are COCO ids, not Detectron2's "
            "contiguous ids (Detectron2's COCOEvaluator on coco_2017_val needs the coco80 layout)"
        )
    return Conversion(out, config, base, notes)


#: What backbone-only weights (``swin-imagenet``) leave to the model's initialisation: the detector
#: and the per-stage output norms of the Swin backbone.
_NOT_IN_BACKBONE_WEIGHTS = re.compile(r"(?!backbone\.)|backbone\.norm\d+\.")


def check_against_model(state_dict: Dict[str, torch.Tensor], model: nn.Module, backbone_only: bool = False) -> None:
    """Raises ``KeyError`` / ``ValueError`` naming the tensors unless ``state_dict`` has exactly
    the model's names with the model's shapes (what a strict load needs). ``backbone_only``:
    the detector and the Swin ``backbone.norm{i}`` may be absent."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not (backbone_only and _NOT_IN_BACKBONE_WEIGHTS.match(k))]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise KeyError(
            f"converted checkpoint does not match the model: {len(missing)} missing "
            f"(first: {missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]})"
        )
    for k, v in expected.items():
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape):
            raise ValueError(f"{k}: converted shape {tuple(state_dict[k].shape)} != model shape {tuple(v.shape)}")
