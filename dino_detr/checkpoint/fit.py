"""Does a checkpoint fit the model? The rule that stops a run on the wrong weights.

The class-dependent tensors (classification heads of the decoder and the encoder, and the
denoising label embedding) are re-initialised when fine-tuning to another set of classes;
they are defined once here and left out of the count.
"""

import re
from typing import Iterable, Sequence

__all__ = ["CLASS_DEPENDENT_KEY_PATTERNS", "MIN_LOADED_FRACTION", "is_class_dependent", "check_checkpoint_fits"]

# State-dict keys (regular expressions, matched at the start) of DinoDetr whose shape depends on
# MODEL.DINO.NUM_CLASSES (or DN_LABELBOOK_SIZE).
CLASS_DEPENDENT_KEY_PATTERNS = (
    r"class_embed\.",  # decoder classification heads, one per layer
    r"transformer\.enc_out_class_embed\.",  # encoder proposal classifier
    r"label_enc\.",  # denoising label embedding (label book + 1 rows)
)
_CLASS_DEPENDENT = re.compile("|".join(f"(?:{p})" for p in CLASS_DEPENDENT_KEY_PATTERNS))

# A checkpoint must supply at least this fraction of the model's other tensors, or of its
# backbone's (an ImageNet initialisation of the backbone).
MIN_LOADED_FRACTION = 0.6


def is_class_dependent(key: str) -> bool:
    """Whether the state-dict ``key`` is one of the class-dependent tensors."""
    return _CLASS_DEPENDENT.match(key) is not None


def check_checkpoint_fits(
    model_keys: Iterable[str], not_loaded: Iterable[str], source: str, unexpected: Sequence[str] = ()
) -> None:
    """Raise ``ValueError`` when a checkpoint supplied fewer than ``MIN_LOADED_FRACTION`` of the
    model's tensors and fewer than that fraction of its ``backbone.*`` tensors.

    Args:
        model_keys: the model's state-dict keys.
        not_loaded: those the checkpoint did not supply (missing, or skipped for their shape).
        source: the checkpoint, for the message.
        unexpected: checkpoint keys the model does not have (a few are shown).
    Class-dependent keys and BatchNorm's ``num_batches_tracked`` counters are not counted.
    """
    counted = [k for k in model_keys if not is_class_dependent(k) and not k.endswith("num_batches_tracked")]
    skipped = set(not_loaded)
    missing = [k for k in counted if k in skipped]
    backbone = [k for k in counted if k.startswith("backbone.")]
    backbone_loaded = sum(k not in skipped for k in backbone)
    loaded = len(counted) - len(missing)
    if loaded >= MIN_LOADED_FRACTION * len(counted) or (
        backbone and backbone_loaded >= MIN_LOADED_FRACTION * len(backbone)
    ):
        return
    extra = f"; the checkpoint has other keys, e.g. {list(unexpected[:3])}" if unexpected else ""
    raise ValueError(
        f"{source} does not fit this model: it supplied {loaded} of the model's {len(counted)} tensors "
        f"({backbone_loaded} of {len(backbone)} backbone tensors; class-dependent heads not counted), fewer "
        f"than the {MIN_LOADED_FRACTION:.0%} of the model or of its backbone a checkpoint must supply. "
        f"Not loaded, e.g.: {missing[:3]}{extra}. Check MODEL.WEIGHTS and the config it belongs to."
    )
