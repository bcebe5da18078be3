"""Guards against non-finite training: stop before a non-finite update is applied, and
never write non-finite weights to a checkpoint."""
import math

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.events import get_event_storage

from dino_detr.checkpoint.finetune import drop_mismatched_class_tensors, mismatched_class_tensors

__all__ = ["check_finite_grad_norm", "FiniteCheckpointer"]


def _current_iteration() -> str:
    try:
        return str(get_event_storage().iter)
    except AssertionError:  # outside a training loop: no event storage
        return "?"


def check_finite_grad_norm(total_norm: torch.Tensor) -> None:
    """Raise ``FloatingPointError`` when the total gradient norm is NaN or Inf.

    Called before the optimizer applies an update, so the weights (and every checkpoint
    written so far) keep their last finite values.
    """
    value = float(total_norm)
    if not math.isfinite(value):
        raise FloatingPointError(
            f"Non-finite gradient norm ({value}) at iteration {_current_iteration()}: the loss or a gradient "
            "became NaN/Inf. Training stopped before applying the update; the last checkpoint in "
            "OUTPUT_DIR holds the last finite weights. Lower SOLVER.BASE_LR, enable "
            "SOLVER.CLIP_GRADIENTS or check the data."
        )


class FiniteCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that refuses to save a model holding NaN/Inf values, and
    loads checkpoints of another class count for fine-tuning (their class-dependent tensors
    are re-initialised, see :func:`drop_mismatched_class_tensors`) unless
    ``reinit_class_tensors=False`` (evaluation), where such a checkpoint is an error."""

    def __init__(self, model, save_dir: str = "", *, reinit_class_tensors: bool = True, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.reinit_class_tensors = reinit_class_tensors

    def _load_model(self, checkpoint):
        if not self.reinit_class_tensors:
            mismatched = mismatched_class_tensors(checkpoint["model"], self.model)
            if mismatched:
                rows, own = checkpoint["model"][mismatched[0]].shape[0], self.model.state_dict()[mismatched[0]].shape[0]
                raise ValueError(
                    f"the checkpoint was trained for another number of classes ({mismatched[0]} has {rows} rows, "
                    f"the model {own}: MODEL.DINO.NUM_CLASSES); evaluating it would use untrained class heads. "
                    "Fine-tune it first (tools/train_net.py without --eval-only)."
                )
        checkpoint["model"], _ = drop_mismatched_class_tensors(checkpoint["model"], self.model)
        return super()._load_model(checkpoint)

    def save(self, name: str, **kwargs) -> None:
        bad = [k for k, v in self.model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise FloatingPointError(
                f"Refusing to save checkpoint '{name}': non-finite values in {bad[:5]}"
                f"{' ...' if len(bad) > 5 else ''}; the previous checkpoints are kept."
            )
        super().save(name, **kwargs)
