"""Guards against non-finite training: stop before a non-finite update is applied, and
never write non-finite weights to a checkpoint."""

import contextlib
import math
import os

import torch
from detectron2.utils.events import get_event_storage

from dino_detr.checkpoint import SafeCheckpointer

__all__ = ["check_finite_grad_norm", "FiniteCheckpointer"]


def _current_iteration() -> str:
    try:
        return str(get_event_storage().iter)
    except AssertionError:  # outside a training loop: no event storage
        return "?"


def _last_checkpoint_note(output_dir: str) -> str:
    """Which checkpoint holds the last finite weights, as found in ``output_dir``."""
    with contextlib.suppress(OSError):
        with open(os.path.join(output_dir, "last_checkpoint")) as f:
            path = os.path.join(output_dir, f.read().strip())
        if os.path.isfile(path):
            return f"the last checkpoint, {path}, holds the last finite weights (--resume continues from it)"
    return f"no checkpoint has been written to OUTPUT_DIR ({output_dir or 'not set'}) yet"


def check_finite_grad_norm(total_norm: torch.Tensor, output_dir: str = "") -> None:
    """Raise ``FloatingPointError`` when the total gradient norm is NaN or Inf.

    Called before the optimizer applies an update, so the weights (and every checkpoint
    written so far) keep their last finite values; the message names the last checkpoint
    in ``output_dir`` (or says there is none).
    """
    value = float(total_norm)
    if not math.isfinite(value):
        raise FloatingPointError(
            f"Non-finite gradient norm ({value}) at iteration {_current_iteration()}: the loss or a gradient "
            f"became NaN/Inf. Training stopped before applying the update; {_last_checkpoint_note(output_dir)}. "
            "Lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRADIENTS or check the data."
        )


class FiniteCheckpointer(SafeCheckpointer):
    """``SafeCheckpointer`` that refuses to save a model holding NaN/Inf values; it loads
    checkpoints of another class count for fine-tuning unless ``reinit_class_tensors=False``."""

    def __init__(self, model, save_dir: str = "", *, reinit_class_tensors: bool = True, **checkpointables):
        super().__init__(model, save_dir, reinit_class_tensors=reinit_class_tensors, **checkpointables)

    def save(self, name: str, **kwargs) -> None:
        bad = [k for k, v in self.model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise FloatingPointError(
                f"Refusing to save checkpoint '{name}': non-finite values in {bad[:5]}"
                f"{' ...' if len(bad) > 5 else ''}; {_last_checkpoint_note(self.save_dir)}."
            )
        super().save(name, **kwargs)
