"""Reading source checkpoints safely and writing checkpoints crash-safely (``atomic_open``, from
``dino_detr.fileio``) with a clear error when the disk is full."""

import argparse
import os
import shutil
from typing import IO, Any, Dict, Optional

import torch

from ..fileio import atomic_open
from .layouts import checkpoint_weights
from .safe_load import load_torch_weights

__all__ = ["SOURCE_GLOBALS", "atomic_open", "load_source_state_dict", "save_detectron2_checkpoint", "save_torch_file"]

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
    save_torch_file({"model": state_dict, "__author__": "dino_detr.checkpoint", "matching_heuristics": False}, path)


class _WriteErrorRecorder:
    """A binary file's ``write``/``flush`` that remembers the ``OSError`` a write raised: ``torch.save``
    swallows it and reports only ``unexpected pos ...``."""

    def __init__(self, file: IO[bytes]):
        self.file = file
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.file.flush()


def save_torch_file(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_open`: ``path`` is replaced only by a complete file.
    A failed write (a full disk, a file size limit) raises an ``OSError`` that names ``path``, the
    system's reason and the space left on that disk; ``path`` keeps its previous content."""
    with atomic_open(path) as f:
        recorder = _WriteErrorRecorder(f)
        try:
            torch.save(obj, recorder)
        except (RuntimeError, OSError) as e:
            cause = recorder.error or (e if isinstance(e, OSError) else None)
            if cause is None:
                raise
            free_gib = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**30
            raise OSError(
                cause.errno,
                f"cannot write {path}: {cause.strerror or cause} ({free_gib:.2f} GiB free on its disk); "
                "the previous file, if any, is kept",
            ) from e
