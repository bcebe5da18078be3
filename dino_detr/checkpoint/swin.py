"""Swin parts of the checkpoint conversion: the buffers that Swin checkpoints store but that follow
from the architecture (checked, not copied), the Swin config read off the tensors, the channel
order of mmdetection's patch merging, and the ImageNet classifiers of microsoft/Swin-Transformer
(``swin_large_patch4_window12_384_22k.pth``) as backbone-only Detectron2 weights."""

import math
import re
from typing import Dict, List, Tuple

import torch

from ..modeling.swin import relative_position_index, shifted_window_mask
from .rename import SWIN_BODY, layer_count

__all__ = [
    "is_swin_buffer",
    "check_swin_buffer",
    "infer_swin_config",
    "convert_swin_classifier",
    "unfold_to_concat_order",
    "reorder_patch_merging",
]

# official / ImageNet ``layers.{i}.blocks.{j}.attn.*``; mmdetection ``stages.{i}.blocks.{j}.attn.w_msa.*``
_BUFFER = re.compile(
    r"(.*\.)?(layers\.\d+\.blocks\.\d+\.(attn\.relative_position_index|attn_mask)"
    r"|stages\.\d+\.blocks\.\d+\.attn\.w_msa\.relative_position_index)\Z"
)
_PATCH_MERGING = re.compile(r"backbone\.layers\.\d+\.downsample\.(reduction\.weight|norm\.(weight|bias))\Z")
_BODY = re.compile(SWIN_BODY + r"\Z")
_CLASSIFIER_ONLY = re.compile(r"(head|norm)\.(weight|bias)\Z")
#: The published Swin backbones and the config files built for them.
_SWIN_L = (192, [2, 2, 18, 2], [6, 12, 24, 48], 12)
_SWIN_T = (96, [2, 2, 6, 2], [3, 6, 12, 24], 7)


def is_swin_buffer(key: str) -> bool:
    """``relative_position_index`` (official DINO, ImageNet, mmdetection) or ``attn_mask`` (ImageNet) of a block."""
    return _BUFFER.match(key) is not None


def _side(n: int, what: str, key: str) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{key}: {what} {n} is not a square")
    return side


def check_swin_buffer(key: str, tensor: torch.Tensor) -> None:
    """Raises ``ValueError`` naming ``key`` unless the buffer is the one the architecture implies:
    the relative position index of its window, or the shifted-window mask of a square map."""
    if tensor.dim() < 2 or tensor.shape[-1] != tensor.shape[-2]:
        raise ValueError(f"{key}: shape {tuple(tensor.shape)} is not (..., T, T)")
    window = _side(tensor.shape[-1], "window tokens", key)
    if key.endswith("relative_position_index"):
        expected = relative_position_index(window)
    else:
        side = window * _side(tensor.shape[0], "number of windows", key)
        expected = shifted_window_mask(side, side, window, window // 2)
    if tuple(tensor.shape) != tuple(expected.shape) or not torch.equal(tensor.to(expected.dtype), expected):
        raise ValueError(f"{key}: differs from the {key.rsplit('.', 1)[-1]} of a {window}x{window} window")


def unfold_to_concat_order(channels: int) -> torch.Tensor:
    """Where each input channel of this project's :class:`~dino_detr.modeling.swin.PatchMerging`
    sits in mmdetection's.

    Both merge each 2x2 neighbourhood of a (H, W, C) map into 4C channels. This project concatenates
    the neighbours x0 (row 0, column 0), x1 (1, 0), x2 (0, 1), x3 (1, 1) as the Swin paper does:
    channel ``k * C + c``. mmdetection samples them with ``nn.Unfold(kernel_size=2, stride=2)`` on the
    (C, H, W) map: channel ``c * 4 + 2 * row + column``.

    Args:
        channels: 4C.
    Returns:
        (4C,) int64 ``index``: ours[..., j] = mmdetection's[..., index[j]].
    """
    c = channels // 4
    neighbour, channel = torch.arange(4).repeat_interleave(c), torch.arange(c).repeat(4)
    row, column = neighbour % 2, neighbour // 2
    return channel * 4 + 2 * row + column


def reorder_patch_merging(out: Dict[str, torch.Tensor]) -> int:
    """Permutes the 4C input channels of every ``backbone.layers.{i}.downsample`` (reduction weight
    (2C, 4C), norm weight and bias (4C,)) from mmdetection's order to this project's
    (:func:`unfold_to_concat_order`), in place. Returns the number of tensors permuted."""
    keys = [k for k in out if _PATCH_MERGING.match(k)]
    for key in keys:
        channels = out[key].shape[-1]
        if channels % 4:
            raise ValueError(
                f"{key}: {channels} patch-merging input channels, not a multiple of 4 (4 x the stage's channels)"
            )
        out[key] = out[key].index_select(-1, unfold_to_concat_order(channels))
    return len(keys)


def _window(table: torch.Tensor, key: str) -> int:
    """Window side w from a (2w - 1)^2-row relative position bias table."""
    return (_side(table.shape[0], "bias table rows", key) + 1) // 2


def _architecture(sd: Dict[str, torch.Tensor], prefix: str) -> Dict[str, object]:
    """MODEL.SWIN keys (except OUT_FEATURES) of the Swin body under ``prefix``."""
    proj = sd[prefix + "patch_embed.proj.weight"]
    stages = layer_count(sd, prefix + "layers.")
    depths = [layer_count(sd, f"{prefix}layers.{i}.blocks.") for i in range(stages)]
    tables = {f"{prefix}layers.{i}.blocks.0.attn.relative_position_bias_table": None for i in range(stages)}
    windows = {k: _window(sd[k], k) for k in tables}
    if len(set(windows.values())) != 1:
        raise ValueError(f"Swin stages have different window sizes: {windows}")
    fc1 = sd[prefix + "layers.0.blocks.0.mlp.fc1.weight"]
    return {
        "MODEL.BACKBONE.NAME": "build_swin_backbone",
        "MODEL.SWIN.PATCH_SIZE": proj.shape[-1],
        "MODEL.SWIN.EMBED_DIM": proj.shape[0],
        "MODEL.SWIN.DEPTHS": depths,
        "MODEL.SWIN.NUM_HEADS": [sd[k].shape[1] for k in tables],
        "MODEL.SWIN.WINDOW_SIZE": next(iter(windows.values())),
        "MODEL.SWIN.MLP_RATIO": fc1.shape[0] / fc1.shape[1],
    }


def _base_config(arch: Dict[str, object], levels: int) -> str:
    key = (
        arch["MODEL.SWIN.EMBED_DIM"],
        arch["MODEL.SWIN.DEPTHS"],
        arch["MODEL.SWIN.NUM_HEADS"],
        arch["MODEL.SWIN.WINDOW_SIZE"],
    )
    if key == _SWIN_T and levels == 4:
        return "configs/dino_swint_4scale.yaml"
    return f"configs/dino_swinl_{levels if key == _SWIN_L and levels in (4, 5) else 4}scale.yaml"


def infer_swin_config(out: Dict[str, torch.Tensor], in_channels: List[int], levels: int) -> Tuple[Dict, str]:
    """Backbone config keys and base config file of a converted DINO with a Swin ``backbone.*``.

    Args:
        in_channels: input channels of the 1x1 ``input_proj`` levels, finest first.
        levels: number of feature levels.
    """
    arch = _architecture(out, "backbone.")
    norms = sorted(int(m.group(1)) for m in map(re.compile(r"backbone\.norm(\d+)\.weight\Z").match, out) if m)
    dims = [arch["MODEL.SWIN.EMBED_DIM"] * 2**i for i in norms]
    if dims != in_channels:
        raise ValueError(
            f"input_proj levels take {in_channels} channels, but the Swin backbone returns stages "
            f"{norms} (backbone.norm*) with {dims} channels"
        )
    features = [f"swin{i}" for i in norms]
    config = {**arch, "MODEL.SWIN.OUT_FEATURES": features, "MODEL.DINO.IN_FEATURES": features}
    return config, _base_config(arch, levels)


def convert_swin_classifier(state_dict: Dict[str, torch.Tensor]):
    """An ImageNet Swin classifier (microsoft/Swin-Transformer layout) -> the Swin backbone of
    ``DinoDetr`` (``backbone.*``), for training DINO from it.

    Returns:
        (state dict, config keys, base config file, notes).
    Raises:
        KeyError / ValueError naming the tensor: unknown tensors, a detection checkpoint, wrong buffers.
    """
    if "patch_embed.proj.weight" not in state_dict:
        hit = next((k for k in state_dict if k.startswith("backbone.")), None)
        if hit is not None:
            raise ValueError(
                f"{hit!r} is a tensor of a detection checkpoint, not of an ImageNet Swin classifier: "
                "use source 'official'"
            )
        raise KeyError("swin-imagenet checkpoint: patch_embed.proj.weight is missing: not a Swin classifier")
    out, buffers, dropped = {}, 0, []
    for key, tensor in state_dict.items():
        if is_swin_buffer(key):
            check_swin_buffer(key, tensor)
            buffers += 1
        elif _CLASSIFIER_ONLY.match(key):
            dropped.append(f"{key} {tuple(tensor.shape)}")
        elif _BODY.match(key):
            out["backbone." + key] = tensor.detach().to("cpu").clone()
        else:
            raise KeyError(
                f"swin-imagenet checkpoint: unknown tensor {key!r} (not part of a Swin classifier as this "
                "converter knows it; absolute position embeddings are not supported)"
            )
    arch = _architecture(out, "backbone.")
    notes = [
        f"{buffers} relative_position_index / attn_mask buffers checked against the architecture, not copied",
        f"classifier only, not copied: {', '.join(dropped) or 'nothing'}; the detection backbone's per-stage "
        "norm{i} keep their initial values (LayerNorm 1 / 0), as in the official DINO training from these weights",
    ]
    return out, arch, _base_config(arch, 4), notes
