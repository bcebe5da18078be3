"""Reading source checkpoints safely and writing Detectron2 checkpoints."""

import argparse
import os
from typing import Dict

import torch

__all__ = ["load_source_state_dict", "save_detectron2_checkpoint"]

# Published checkpoints store their training arguments as an ``argparse.Namespace`` (official
# DINO) next to the weights; it is plain data, so it is allowed under ``weights_only``.
_SAFE_GLOBALS = [argparse.Namespace]


def load_source_state_dict(path: str, allow_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """The model weights of a checkpoint file.

    Args:
        path: a ``.pth`` file holding a state dict or a dict with the state dict under
            ``"model"`` (official DINO, detrex, Detectron2).
        allow_pickle: load with ``weights_only=False`` (runs arbitrary pickled code: only for
            trusted old files that the safe loader rejects).
    Returns:
        name -> tensor, on the CPU.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # the safe unpickler names the object it refused
        if allow_pickle:
            raise
        raise RuntimeError(
            f"{path}: cannot be loaded with torch.load(weights_only=True) ({e}). If you trust this file, "
            "convert it with --allow-pickle."
        ) from e
    state = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: no state dict found (expected a dict of tensors, or one under 'model')")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        kind = type(state[bad[0]]).__name__
        raise ValueError(f"{path}: entry {bad[0]!r} of the state dict is a {kind}, not a tensor")
    return dict(state)


def save_detectron2_checkpoint(state_dict: Dict[str, torch.Tensor], path: str) -> None:
    """Write ``{"model": state_dict}``, the format ``DetectionCheckpointer`` loads by exact names."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    torch.save({"model": state_dict, "__author__": "dino_detr.checkpoint", "matching_heuristics": False}, path)
