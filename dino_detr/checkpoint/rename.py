"""Tensor names of the official DINO, detrex and mmdetection DINO checkpoints -> this project's names.

Each source name is matched against an ordered table of ``(pattern, target)`` rules; a name
no rule matches is an error that names it. Rules are anchored regular expressions, targets
``re`` templates or functions of the match. Names of this project's transformer and heads
follow the official implementation, so official names mostly map to themselves.
"""

import re
from typing import Callable, List, Optional, Sequence, Tuple, Union

__all__ = ["RenameRule", "SWIN_BODY", "official_rules", "detrex_rules", "mmdet_rules", "layer_count", "rename"]

_PARAM = r"(weight|bias)"
_NORM = r"(weight|bias|running_mean|running_var)"
_MSDA = r"(sampling_offsets|attention_weights|value_proj|output_proj)\." + _PARAM
_MHA = r"(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)"
_MLP = r"layers\.\d+\." + _PARAM

#: Tensors of a Swin body (official DINO ``backbone.0.*``, ImageNet classifiers, this project's
#: ``backbone.*``: the same names), except the per-output ``norm{i}`` and derived buffers.
SWIN_BODY = (
    r"(patch_embed\.(proj|norm)\."
    + _PARAM
    + r"|layers\.\d+\.blocks\.\d+\.((norm[12]|attn\.qkv|attn\.proj|mlp\.fc[12])\."
    + _PARAM
    + r"|attn\.relative_position_bias_table)"
    + r"|layers\.\d+\.downsample\.(reduction\.weight|norm\."
    + _PARAM
    + "))"
)

Target = Union[str, Callable[[re.Match], str], None]
RenameRule = Tuple["re.Pattern[str]", Target]


def layer_count(names, prefix: str) -> int:
    """Number of submodules ``{prefix}{i}.`` among ``names``; they must be numbered 0..n-1."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for m in map(pattern.match, names) if m}
    if idx != set(range(len(idx))):
        raise KeyError(f"layers {sorted(idx)} under {prefix!r} are not numbered 0..{len(idx) - 1}")
    return len(idx)


def _rules(table: Sequence[Tuple[str, Target]]) -> List[RenameRule]:
    return [(re.compile(p + r"\Z"), t) for p, t in table]


# Names shared by the official checkpoints and this project (everything but the backbone).
_OURS_BODY = [
    (r"input_proj\.\d+\.[01]\." + _PARAM, r"\g<0>"),
    (r"transformer\.(level_embed|tgt_embed\.weight)", r"\g<0>"),
    (r"transformer\.(enc_output|enc_output_norm|enc_out_class_embed)\." + _PARAM, r"\g<0>"),
    (r"transformer\.enc_out_bbox_embed\." + _MLP, r"\g<0>"),
    (r"transformer\.encoder\.layers\.\d+\.self_attn\." + _MSDA, r"\g<0>"),
    (r"transformer\.encoder\.layers\.\d+\.(norm[12]|linear[12])\." + _PARAM, r"\g<0>"),
    (r"transformer\.decoder\.layers\.\d+\.cross_attn\." + _MSDA, r"\g<0>"),
    (r"transformer\.decoder\.layers\.\d+\.self_attn\." + _MHA, r"\g<0>"),
    (r"transformer\.decoder\.layers\.\d+\.(norm[123]|linear[12])\." + _PARAM, r"\g<0>"),
    (r"transformer\.decoder\.norm\." + _PARAM, r"\g<0>"),
    (r"transformer\.decoder\.(ref_point_head|bbox_embed\.\d+)\." + _MLP, r"\g<0>"),
    (r"class_embed\.\d+\." + _PARAM, r"\g<0>"),
    (r"bbox_embed\.\d+\." + _MLP, r"\g<0>"),
    (r"label_enc\.weight", r"\g<0>"),
]


_TORCHVISION_BLOCK = r"layer([1-4])\.(\d+)\.(conv[1-3]|bn[1-3]|downsample\.[01])\." + _NORM


def _torchvision_block(m: re.Match) -> str:
    """``layer{i}.{b}.{conv|bn}{j}`` / ``downsample.{0|1}`` -> Detectron2 ``res{i+1}.{b}...``."""
    stage, block, part, rest = int(m.group(1)), m.group(2), m.group(3), m.group(4)
    if part in ("downsample.0",) or part.startswith("conv"):
        if rest != "weight":
            raise KeyError(f"unknown tensor {m.group(0)!r} (ResNet convolutions have no {rest})")
    if part.startswith("conv"):
        name = part
    elif part.startswith("bn"):
        name = f"conv{part[2:]}.norm"
    elif part == "downsample.0":
        name = "shortcut"
    else:
        name = "shortcut.norm"
    return f"backbone.res{stage + 1}.{block}.{name}.{rest}"


def official_rules() -> List[RenameRule]:
    """IDEA-Research/DINO (torchvision ResNet under ``backbone.0.body``, or Swin under ``backbone.0``
    with the names of :mod:`dino_detr.modeling.swin`). Targets ``None`` mark aliases
    (``transformer.decoder.class_embed`` is ``class_embed``): checked, not copied."""
    return _rules(
        [
            (r"backbone\.0\.body\.conv1\.weight", "backbone.stem.conv1.weight"),
            (r"backbone\.0\.body\.bn1\." + _NORM, r"backbone.stem.conv1.norm.\1"),
            (r"backbone\.0\.body\." + _TORCHVISION_BLOCK, _torchvision_block),
            (r"backbone\.0\.(" + SWIN_BODY + r"|norm\d\." + _PARAM + ")", r"backbone.\1"),
            (r"transformer\.decoder\.class_embed\.\d+\." + _PARAM, None),
            *_OURS_BODY,
        ]
    )


def _per_layer_head(kind: str, num_decoder_layers: int, name: Callable[[re.Match], str]) -> Callable[[re.Match], str]:
    """Target of head ``group(1)`` of a source with one head per decoder layer plus one more, at
    index ``num_decoder_layers``, for the encoder proposals (detrex, mmdetection); ``name(m)``:
    the tensor's name inside the head."""

    def target(m: re.Match) -> str:
        i = int(m.group(1))
        if i == num_decoder_layers:
            return f"transformer.enc_out_{kind}.{name(m)}"
        if i > num_decoder_layers:
            raise KeyError(f"{m.group(0)}: head index {i} > number of decoder layers {num_decoder_layers}")
        return f"{kind}.{i}.{name(m)}"

    return target


def _channel_mapper(prefix: str, norm: str, num_backbone_levels: int) -> List[Tuple[str, Target]]:
    """A ``ChannelMapper`` neck (``convs.{i}`` on backbone levels, ``extra_convs.{j}`` after them)
    -> ``input_proj.{level}.{0: conv, 1: GroupNorm}``."""
    return [
        (prefix + r"convs\.(\d+)\.conv\." + _PARAM, r"input_proj.\1.0.\2"),
        (prefix + r"convs\.(\d+)\." + norm + r"\." + _PARAM, r"input_proj.\1.1.\2"),
        (
            prefix + r"extra_convs\.(\d+)\.(conv|" + norm + r")\." + _PARAM,
            lambda m: (
                f"input_proj.{num_backbone_levels + int(m.group(1))}.{0 if m.group(2) == 'conv' else 1}.{m.group(3)}"
            ),
        ),
    ]


# detrex / mmdetection decoder layer order: self_attn, norm, cross_attn, norm, ffn, norm (official norm2, norm1, norm3)
_DECODER_NORM = {"0": "norm2", "1": "norm1", "2": "norm3"}


def detrex_rules(num_backbone_levels: int, num_decoder_layers: int) -> List[RenameRule]:
    """IDEA-Research/detrex ``projects/dino`` (Detectron2 ResNet or Swin, ``ChannelMapper`` neck,
    per-layer heads plus one more for the encoder proposals at index ``num_decoder_layers``,
    decoder aliases ``transformer.decoder.{class,bbox}_embed`` of the heads)."""

    def head(kind: str) -> Callable[[re.Match], str]:
        return _per_layer_head(kind, num_decoder_layers, lambda m: m.group(2))

    return _rules(
        [
            (r"backbone\.stem\.conv1\.(weight|norm\." + _NORM + ")", r"\g<0>"),
            (r"backbone\.res[2-5]\.\d+\.(conv[1-3]|shortcut)\.(weight|norm\." + _NORM + ")", r"\g<0>"),
            (r"backbone\.(" + SWIN_BODY + r"|norm\d\." + _PARAM + ")", r"\g<0>"),  # Detectron2's SwinTransformer
            *_channel_mapper(r"neck\.", "norm", num_backbone_levels),
            (r"transformer\.level_embeds", "transformer.level_embed"),
            (
                r"transformer\.encoder\.layers\.(\d+)\.attentions\.0\." + _MSDA,
                r"transformer.encoder.layers.\1.self_attn.\2.\3",
            ),
            (
                r"transformer\.encoder\.layers\.(\d+)\.norms\.([01])\." + _PARAM,
                lambda m: f"transformer.encoder.layers.{m.group(1)}.norm{int(m.group(2)) + 1}.{m.group(3)}",
            ),
            (
                r"transformer\.(encoder|decoder)\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\." + _PARAM,
                r"transformer.\1.layers.\2.linear1.\3",
            ),
            (
                r"transformer\.(encoder|decoder)\.layers\.(\d+)\.ffns\.0\.layers\.1\." + _PARAM,
                r"transformer.\1.layers.\2.linear2.\3",
            ),
            (
                r"transformer\.decoder\.layers\.(\d+)\.attentions\.0\.attn\." + _MHA,
                r"transformer.decoder.layers.\1.self_attn.\2",
            ),
            (
                r"transformer\.decoder\.layers\.(\d+)\.attentions\.1\." + _MSDA,
                r"transformer.decoder.layers.\1.cross_attn.\2.\3",
            ),
            (
                r"transformer\.decoder\.layers\.(\d+)\.norms\.([012])\." + _PARAM,
                lambda m: f"transformer.decoder.layers.{m.group(1)}.{_DECODER_NORM[m.group(2)]}.{m.group(3)}",
            ),
            (r"transformer\.decoder\.(class_embed|bbox_embed)\.\d+\..*", None),
            (r"class_embed\.(\d+)\." + _PARAM, head("class_embed")),
            (r"bbox_embed\.(\d+)\.(" + _MLP + ")", head("bbox_embed")),
            (r"transformer\.(tgt_embed\.weight|(enc_output|enc_output_norm)\." + _PARAM + ")", r"\g<0>"),
            (r"transformer\.decoder\.norm\." + _PARAM, r"\g<0>"),
            (r"transformer\.decoder\.ref_point_head\." + _MLP, r"\g<0>"),
            (r"label_enc\.weight", r"\g<0>"),
        ]
    )


_MMDET_SWIN_BLOCK = r"backbone\.stages\.(\d+)\.blocks\.(\d+)\."
_OURS_SWIN_BLOCK = r"backbone.layers.\1.blocks.\2."

# mmdetection's ``SwinTransformer`` -> this project's Swin names. Its ``PatchMerging`` orders the 4C
# channels as ``nn.Unfold`` does: the caller permutes ``downsample.*`` (``swin.unfold_to_concat_order``).
_MMDET_SWIN = [
    (r"backbone\.patch_embed\.projection\." + _PARAM, r"backbone.patch_embed.proj.\1"),
    (r"backbone\.(patch_embed\.norm|norm\d)\." + _PARAM, r"\g<0>"),
    (_MMDET_SWIN_BLOCK + r"(norm[12]\." + _PARAM + ")", _OURS_SWIN_BLOCK + r"\3"),
    (
        _MMDET_SWIN_BLOCK + r"attn\.w_msa\.((qkv|proj)\." + _PARAM + "|relative_position_bias_table)",
        _OURS_SWIN_BLOCK + r"attn.\3",
    ),
    (_MMDET_SWIN_BLOCK + r"ffn\.layers\.0\.0\." + _PARAM, _OURS_SWIN_BLOCK + r"mlp.fc1.\3"),
    (_MMDET_SWIN_BLOCK + r"ffn\.layers\.1\." + _PARAM, _OURS_SWIN_BLOCK + r"mlp.fc2.\3"),
    (
        r"backbone\.stages\.(\d+)\.downsample\.(reduction\.weight|norm\." + _PARAM + ")",
        r"backbone.layers.\1.downsample.\2",
    ),
]


def mmdet_rules(num_backbone_levels: int, num_decoder_layers: int) -> List[RenameRule]:
    """open-mmlab/mmdetection ``configs/dino`` (torchvision-style ``ResNet`` or mmdetection's
    ``SwinTransformer`` under ``backbone``, ``ChannelMapper`` neck with GroupNorm ``gn`` and
    bias-free convolutions, ``bbox_head`` with one classifier / box MLP per decoder layer plus one
    for the encoder proposals, the denoising label embedding in ``dn_query_generator``). BatchNorm
    ``num_batches_tracked`` counters, Swin ``relative_position_index`` buffers and the patch-merging
    channel order are left to the caller."""
    box_layer = {"0": "0", "2": "1", "4": "2"}  # Sequential(Linear, ReLU, Linear, ReLU, Linear)
    return _rules(
        [
            (r"backbone\.conv1\.weight", "backbone.stem.conv1.weight"),
            (r"backbone\.bn1\." + _NORM, r"backbone.stem.conv1.norm.\1"),
            (r"backbone\." + _TORCHVISION_BLOCK, _torchvision_block),
            *_MMDET_SWIN,
            *_channel_mapper(r"neck\.", "gn", num_backbone_levels),
            (r"level_embed", "transformer.level_embed"),
            (r"query_embedding\.weight", "transformer.tgt_embed.weight"),
            (r"memory_trans_fc\." + _PARAM, r"transformer.enc_output.\1"),
            (r"memory_trans_norm\." + _PARAM, r"transformer.enc_output_norm.\1"),
            (r"encoder\.layers\.(\d+)\.self_attn\." + _MSDA, r"transformer.encoder.layers.\1.self_attn.\2.\3"),
            (
                r"encoder\.layers\.(\d+)\.norms\.([01])\." + _PARAM,
                lambda m: f"transformer.encoder.layers.{m.group(1)}.norm{int(m.group(2)) + 1}.{m.group(3)}",
            ),
            (r"(encoder|decoder)\.layers\.(\d+)\.ffn\.layers\.0\.0\." + _PARAM, r"transformer.\1.layers.\2.linear1.\3"),
            (r"(encoder|decoder)\.layers\.(\d+)\.ffn\.layers\.1\." + _PARAM, r"transformer.\1.layers.\2.linear2.\3"),
            (r"decoder\.layers\.(\d+)\.self_attn\.attn\." + _MHA, r"transformer.decoder.layers.\1.self_attn.\2"),
            (r"decoder\.layers\.(\d+)\.cross_attn\." + _MSDA, r"transformer.decoder.layers.\1.cross_attn.\2.\3"),
            (
                r"decoder\.layers\.(\d+)\.norms\.([012])\." + _PARAM,
                lambda m: f"transformer.decoder.layers.{m.group(1)}.{_DECODER_NORM[m.group(2)]}.{m.group(3)}",
            ),
            (r"decoder\.norm\." + _PARAM, r"transformer.decoder.norm.\1"),
            (r"decoder\.ref_point_head\.(" + _MLP + ")", r"transformer.decoder.ref_point_head.\1"),
            (
                r"bbox_head\.cls_branches\.(\d+)\." + _PARAM,
                _per_layer_head("class_embed", num_decoder_layers, lambda m: m.group(2)),
            ),
            (
                r"bbox_head\.reg_branches\.(\d+)\.([024])\." + _PARAM,
                _per_layer_head(
                    "bbox_embed", num_decoder_layers, lambda m: f"layers.{box_layer[m.group(2)]}.{m.group(3)}"
                ),
            ),
            (r"dn_query_generator\.label_embedding\.weight", "label_enc.weight"),
        ]
    )


def rename(key: str, rules: Sequence[RenameRule], source: str) -> Optional[str]:
    """This project's name for ``key``; ``None`` for an alias of another tensor.

    Raises:
        KeyError: naming ``key`` when no rule knows it (unknown tensor or another model).
    """
    for pattern, target in rules:
        m = pattern.match(key)
        if m is None:
            continue
        if target is None:
            return None
        return target(m) if callable(target) else m.expand(target)
    raise KeyError(f"{source} checkpoint: unknown tensor {key!r} (not part of DINO as this converter knows it)")
