"""DINO (DETR with Improved deNoising anchOr boxes) as a Detectron2 project.

Importing the package registers the meta-architecture ``"DinoDetr"`` and the backbone
``"build_timm_backbone"``; :func:`add_dino_config` adds the ``MODEL.DINO`` keys. It also makes
Detectron2's ``DefaultPredictor`` and ``DefaultTrainer`` load weights with
:class:`dino_detr.checkpoint.SafeCheckpointer` (no code runs from a weight file).
"""

from .checkpoint import use_safe_checkpointer
from .config import add_dino_config, check_dino_config, config_file_path, get_dino_cfg, resolve_device
from .modeling import DinoDetr

use_safe_checkpointer()

__all__ = ["add_dino_config", "check_dino_config", "config_file_path", "get_dino_cfg", "resolve_device", "DinoDetr"]
