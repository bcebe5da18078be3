"""Reading source checkpoints safely and writing checkpoints crash-safely."""

import argparse
import contextlib
import os
import uuid
from typing import IO, Dict, Iterator

import torch

from .layouts import checkpoint_weights
from .safe_load import load_torch_weights

__all__ = ["SOURCE_GLOBALS", "atomic_open", "load_source_state_dict", "save_detectron2_checkpoint"]

#: Published checkpoints store their training arguments as an ``argparse.Namespace`` (official
#: DINO) next to the weights; it is plain data, so it is allowed under ``weights_only``.
SOURCE_GLOBALS = [argparse.Namespace]


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[IO]:
    """A file object whose content replaces ``path`` only once it is completely written.

    Writes a hidden temporary file in the same folder, flushes and fsyncs it, renames it
    over ``path`` (atomic on POSIX) and fsyncs the folder. On any error (or a crash) ``path``
    keeps its previous content and the temporary file is removed (or left hidden).
    """
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power loss
    finally:
        os.close(fd)


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
