"""The DINO model: meta-architecture, transformer, denoising, matching and losses."""

from . import swin, timm_backbone  # noqa: F401  (register "build_swin_backbone", "build_timm_backbone")
from .meta_arch import DinoDetr

__all__ = ["DinoDetr"]
