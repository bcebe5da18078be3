"""Reading source checkpoints safely and writing checkpoints crash-safely (``atomic_open``, from
``dino_detr.fileio``)."""

import argparse
import os
from typing import Dict

import torch

from ..fileio import atomic_open
from .layouts import checkpoint_weights
from .safe_load import load_torch_weights

__all__ = ["SOURCE_GLOBALS", "atomic_open", "load_source_state_dict", "save_detectron2_checkpoint"]

#: Published checkpoints store their training arguments as an ``argparse.Namespace`` (official
#: DINO) next to the weights; it is plain data, so it is allowed under ``weights_only``.
SOURCE_GLOBALS = [argparse.Namespace]


def load_source_state_dict(path: str, with_rest: bool = False):
    """The model weights of a checkpoint file, read with ``torch.load(weights_only=True)``
    unless the file is listed in ``DINO_DETR_TRUSTED_WEIGHTS`` (see ``safe_load``).

    Args:
        path: a ``.pth`` file holding a state dict or a dict with the state dict under
            ``"model"`` (official DINO, detrex, Detectron2) or ``"state_dict"`` (mmdetection).
        with_rest: also return the checkpoint's other entries (e.g. mmdetection's ``"meta"``).
    Returns:
        name -> tensor, on the CPU (and the other entries with ``with_rest``).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    state, rest = checkpoint_weights(load_torch_weights(path, SOURCE_GLOBALS))
    if not isinstance(state, dict) or not state:
        raise ValueError(
            f"{path}: no state dict found (expected a dict of tensors, or one under 'model' / 'state_dict')"
        )
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        kind = type(state[bad[0]]).__name__
        raise ValueError(f"{path}: entry {bad[0]!r} of the state dict is a {kind}, not a tensor")
    return (dict(state), rest) if with_rest else dict(state)


def save_detectron2_checkpoint(state_dict: Dict[str, torch.Tensor], path: str) -> None:
    """Write ``{"model": state_dict}``, the format ``DetectionCheckpointer`` loads by exact names."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path) as f:
        torch.save({"model": state_dict, "__author__": "dino_detr.checkpoint", "matching_heuristics": False}, f)
