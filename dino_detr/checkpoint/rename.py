"""Tensor names of the official DINO and detrex DINO checkpoints -> this project's names.

Each source name is matched against an ordered table of ``(pattern, target)`` rules; a name
no rule matches is an error that names it. Rules are anchored regular expressions, targets
``re`` templates or functions of the match. Names of this project's transformer and heads
follow the official implementation, so official names mostly map to themselves.
"""

import re
from typing import Callable, List, Optional, Sequence, Tuple, Union

__all__ = ["RenameRule", "SWIN_BODY", "official_rules", "detrex_rules", "layer_count", "rename"]

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


def _torchvision_block(m: re.Match) -> str:
    """``layer{i}.{b}.{conv|bn}{j}`` / ``downsample.{0|1}`` -> Detectron2 ``res{i+1}.{b}...``."""
    stage, block, part, rest = int(m.group(1)), m.group(2), m.group(3), m.group(4)
    if part in ("downsample.0",) or part.startswith("conv"):
        if rest != "weight":
            raise KeyError(f"official checkpoint: unknown tensor {m.group(0)!r} (ResNet convolutions have no {rest})")
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
            (
                r"backbone\.0\.body\.layer([1-4])\.(\d+)\.(conv[1-3]|bn[1-3]|downsample\.[01])\." + _NORM,
                _torchvision_block,
            ),
            (r"backbone\.0\.(" + SWIN_BODY + r"|norm\d\." + _PARAM + ")", r"backbone.\1"),
            (r"transformer\.decoder\.class_embed\.\d+\." + _PARAM, None),
            *_OURS_BODY,
        ]
    )


def detrex_rules(num_backbone_levels: int, num_decoder_layers: int) -> List[RenameRule]:
    """IDEA-Research/detrex ``projects/dino`` (Detectron2 ResNet, ``ChannelMapper`` neck,
    per-layer heads plus one more for the encoder proposals at index ``num_decoder_layers``,
    decoder aliases ``transformer.decoder.{class,bbox}_embed`` of the heads)."""

    def head(kind: str) -> Callable[[re.Match], str]:
        def target(m: re.Match) -> str:
            i = int(m.group(1))
            if i == num_decoder_layers:
                return f"transformer.enc_out_{kind}.{m.group(2)}"
            if i > num_decoder_layers:
                raise KeyError(f"{m.group(0)}: head index {i} > number of decoder layers {num_decoder_layers}")
            return f"{kind}.{i}.{m.group(2)}"

        return target

    # detrex layer order: self_attn, norm, cross_attn, norm, ffn, norm (official norm2, norm1, norm3)
    decoder_norm = {"0": "norm2", "1": "norm1", "2": "norm3"}
    return _rules(
        [
            (r"backbone\.stem\.conv1\.(weight|norm\." + _NORM + ")", r"\g<0>"),
            (r"backbone\.res[2-5]\.\d+\.(conv[1-3]|shortcut)\.(weight|norm\." + _NORM + ")", r"\g<0>"),
            (r"neck\.convs\.(\d+)\.conv\." + _PARAM, r"input_proj.\1.0.\2"),
            (r"neck\.convs\.(\d+)\.norm\." + _PARAM, r"input_proj.\1.1.\2"),
            (
                r"neck\.extra_convs\.(\d+)\.(conv|norm)\." + _PARAM,
                lambda m: (
                    f"input_proj.{num_backbone_levels + int(m.group(1))}."
                    f"{0 if m.group(2) == 'conv' else 1}.{m.group(3)}"
                ),
            ),
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
                lambda m: f"transformer.decoder.layers.{m.group(1)}.{decoder_norm[m.group(2)]}.{m.group(3)}",
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
