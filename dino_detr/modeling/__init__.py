"""The DINO model: meta-architecture, transformer, denoising, matching and losses."""
from . import timm_backbone  # noqa: F401  (registers "build_timm_backbone")
from .meta_arch import DinoDetr

__all__ = ["DinoDetr"]
