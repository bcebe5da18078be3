"""Fine-tuning a DINO checkpoint to another number of classes: the class-dependent tensors
whose shapes differ from the model's are left out of the state dict (so they keep the
model's fresh initialisation), and the log says which and why."""

import logging
from typing import Dict, List, Tuple

from torch import nn

from .fit import is_class_dependent

__all__ = ["mismatched_class_tensors", "drop_mismatched_class_tensors"]

logger = logging.getLogger(__name__)


def mismatched_class_tensors(state_dict: Dict, model: nn.Module) -> List[str]:
    """Names of the class-dependent entries (:func:`is_class_dependent`) of ``state_dict`` whose
    shape differs from ``model``'s."""
    own = model.state_dict()
    return [
        k for k, v in state_dict.items() if is_class_dependent(k) and k in own and tuple(v.shape) != tuple(own[k].shape)
    ]


def drop_mismatched_class_tensors(state_dict: Dict, model: nn.Module) -> Tuple[Dict, List[str]]:
    """The checkpoint ``state_dict`` without the class-dependent entries whose shape
    differs from ``model``'s, and their names. Other entries (also mismatched ones) are
    kept, for the checkpointer to judge. Logs one line per dropped tensor.

    Args:
        state_dict: name -> tensor (or array) of a checkpoint, names as in ``model``.
    """
    own = model.state_dict()
    dropped = mismatched_class_tensors(state_dict, model)
    if dropped:
        lines = "\n  ".join(
            f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)}" for k in dropped
        )
        logger.warning(
            f"Fine-tuning to another number of classes: {len(dropped)} class-dependent tensor(s) keep their new "
            f"random initialisation because their checkpoint shape differs from the model's:\n  {lines}"
        )
    return {k: v for k, v in state_dict.items() if k not in dropped}, dropped
