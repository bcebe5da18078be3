"""Published DINO weights as ready models, like ``detectron2.model_zoo``.

    from dino_detr import model_zoo
    cfg = model_zoo.get_config("detrex/dino_r50_4scale_12ep")        # config + MODEL.WEIGHTS
    model = model_zoo.get("mmdet/dino-4scale_r50_8xb2-12e_coco")      # built, weights loaded, eval mode

Names are those of :data:`dino_detr.checkpoint.PUBLISHED_WEIGHTS` (``dino_detr://`` optional); the
same config is used by ``--config-file dino_detr://<name>`` in the tools.
"""

import os
from typing import Optional

from .checkpoint import SafeCheckpointer, published_weights
from .checkpoint.zoo import PREFIX
from .config import get_dino_cfg, resolve_device

__all__ = ["get_config", "get_config_file", "get", "list_names"]

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def list_names():
    """The known names."""
    from .checkpoint import PUBLISHED_WEIGHTS

    return list(PUBLISHED_WEIGHTS)


def get_config_file(name: str) -> str:
    """Path of this project's config file the weights ``name`` fit (its options: :func:`get_config`)."""
    path = os.path.join(_REPO, published_weights(name).config)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: config {path} not found (dino_detr.model_zoo needs a source checkout)")
    return path


def get_config(name: str, trained: bool = True, opts=()):
    """Detectron2 config of the published weights ``name``: this project's config file, the options
    that reproduce the source's model, ``MODEL.WEIGHTS dino_detr://<name>`` when ``trained``, then
    ``opts``. Unknown names raise ``KeyError`` listing the known ones."""
    entry = published_weights(name)
    weights = [PREFIX + entry.name] if trained else [""]
    return get_dino_cfg(get_config_file(name), [*entry.opts, "MODEL.WEIGHTS", *weights, *opts])


def get(name: str, trained: bool = True, device: Optional[str] = None):
    """The model of ``name`` (eval mode) with its published weights when ``trained``, downloaded
    once and verified (see ``dino_detr.checkpoint.zoo``), on ``device`` (default: the config's,
    or the CPU without CUDA)."""
    from detectron2.modeling import build_model

    cfg = get_config(name, trained)
    cfg.MODEL.DEVICE = device or resolve_device(cfg.MODEL.DEVICE)
    model = build_model(cfg).eval()
    if trained:
        SafeCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model
