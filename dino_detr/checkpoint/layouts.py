"""Checkpoints of the official DINO, detrex and mmdetection loaded as they are published: the
layout is recognised from the tensor names and converted in memory by the code of
``tools/convert_checkpoint.py`` (:func:`convert_state_dict`), with one log line.

The model must be built with the config the weights need (position embedding, per-layer heads):
a model that differs raises an error listing the config options (``dino_detr.model_zoo`` gives
each published checkpoint's config).
"""

import logging
import re
from typing import Any, Dict, List, Optional, Tuple

from torch import nn

from ..modeling.meta_arch import DinoDetr
from .convert import Conversion, convert_state_dict, source_of

__all__ = ["LAYOUTS", "as_project_checkpoint", "checkpoint_weights", "layout_of", "mmdet_source_config"]

logger = logging.getLogger(__name__)

#: ``dino_detr``: this project's names (Detectron2 checkpoints); the others are converted.
LAYOUTS = ("dino_detr", "official", "detrex", "mmdet")


def checkpoint_weights(obj: Any) -> Tuple[Optional[Dict], Dict]:
    """``(state dict, everything else)`` of a loaded checkpoint: the weights under ``"model"``
    (Detectron2, official DINO, detrex), ``"state_dict"`` (mmdetection) or the dict itself."""
    if not isinstance(obj, dict):
        return None, {}
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            return obj[key], {k: v for k, v in obj.items() if k != key}
    return obj, {}


def layout_of(names) -> str:
    """One of :data:`LAYOUTS` from the tensor names (``dino_detr`` when no other source's names occur)."""
    found = source_of(names)
    return "dino_detr" if found is None else found[0]


def mmdet_source_config(meta: Any) -> Dict[str, object]:
    """Position-embedding settings read from the config text mmdetection stores in a checkpoint
    (``meta["cfg"]``); empty when there is none (the converter then assumes the base config)."""
    text = meta.get("cfg") if isinstance(meta, dict) else None
    if not isinstance(text, str):
        return {}
    block = re.search(r"positional_encoding\s*=\s*dict\(([^)]*)\)", text)
    if block is None:
        return {}
    out = {}
    temperature = re.search(r"temperature\s*=\s*([-0-9.e]+)", block.group(1))
    offset = re.search(r"offset\s*=\s*([-0-9.e]+)", block.group(1))
    if temperature:  # an int in this project's config
        value = float(temperature.group(1))
        out["MODEL.DINO.PE_TEMPERATURE_H"] = out["MODEL.DINO.PE_TEMPERATURE_W"] = (
            int(value) if value.is_integer() else value
        )
    if offset:
        out["MODEL.DINO.PE_OFFSET"] = float(offset.group(1))
    return out


def _model_differences(conversion: Conversion, model: nn.Module) -> List[str]:
    """Config options the converted weights need that ``model`` was not built with (those a
    strict load cannot see: position embedding, heads shared across decoder layers, the box
    prediction's inverse-sigmoid floor)."""
    needed = conversion.config
    opts = []
    pe = getattr(model, "position_embedding", None)
    for key, attr in (
        ("PE_TEMPERATURE_H", "temperature_h"),
        ("PE_TEMPERATURE_W", "temperature_w"),
        ("PE_OFFSET", "offset"),
    ):
        value = needed.get(f"MODEL.DINO.{key}")
        if value is not None and hasattr(pe, attr) and float(getattr(pe, attr)) != float(value):
            opts += [f"MODEL.DINO.{key}", f"{value:g}"]
    eps = needed.get("MODEL.DINO.BOX_PREDICTION_EPS")
    if eps is not None and float(model.box_prediction_eps) != float(eps):
        opts += ["MODEL.DINO.BOX_PREDICTION_EPS", f"{eps:g}"]
    for key, heads in (("CLASS", "class_embed"), ("BBOX", "bbox_embed")):
        modules = getattr(model, heads, None)
        shared = modules is not None and len(modules) > 1 and modules[0] is modules[1]
        if shared and needed.get(f"MODEL.DINO.DEC_PRED_{key}_EMBED_SHARE") is False:
            opts += [f"MODEL.DINO.DEC_PRED_{key}_EMBED_SHARE", "False"]
    return opts


def _has_tensor(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is one of ``model``'s own parameters or buffers."""
    for get in (model.get_parameter, model.get_buffer):
        try:
            get(name)
            return True
        except AttributeError:
            pass
    return False


def as_project_checkpoint(loaded: Any, model: nn.Module, path: str) -> Any:
    """``loaded`` (a checkpoint as read from ``path``) as a Detectron2 checkpoint of this
    project's model: converted in memory when ``model`` is a :class:`DinoDetr` and the names are
    another DINO source's, not the model's own; unchanged otherwise (this project's layout, other
    Detectron2 models, whose names may look like a source's: ``neck.``, ``bbox_head.``).

    Official 91-id classifiers are remapped to the 80 COCO classes when the model has 80 classes
    and kept otherwise; a model with another number of classes is left to the fine-tuning rule.

    Raises:
        ValueError: the model was built without config options the weights need (they are listed).
    """
    state, rest = checkpoint_weights(loaded)
    if state is None or not all(isinstance(k, str) for k in state):
        return loaded
    found = source_of(state)
    if found is None or not isinstance(model, DinoDetr) or _has_tensor(model, found[1]):
        return loaded if "model" in loaded else {"model": loaded}
    layout = found[0]
    rows = model.class_embed[0].out_features
    class_layout = "coco80" if layout == "official" and rows == 80 else "source"
    source_config = mmdet_source_config(rest.get("meta")) if layout == "mmdet" else None
    conversion = convert_state_dict(state, layout, class_layout, source_config)
    logger.info(
        f"{path}: {layout} DINO checkpoint, {len(state)} tensors converted in memory to {len(conversion.state_dict)} "
        f"of this model ({'; '.join(conversion.notes)})"
    )
    missing = _model_differences(conversion, model)
    if missing:
        raise ValueError(
            f"{path} is a {layout} DINO checkpoint whose model differs from the one built: add the config options "
            f"{' '.join(missing)} (or use its config from dino_detr.model_zoo: --config-file dino_detr://<name>)"
        )
    return {"model": conversion.state_dict, "__author__": f"{layout} (converted on load)", "matching_heuristics": False}
