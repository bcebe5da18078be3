"""Multi-scale inputs of the DINO transformer: per-level input projections and padding
masks on top of a Detectron2 backbone."""

from typing import List, Tuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["InputProjection", "downsample_mask"]


def downsample_mask(mask: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a padding mask.

    Args:
        mask: (N, H, W) bool, True at padded pixels.
        size: target (h, w).
    Returns:
        (N, h, w) bool.
    """
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


class InputProjection(nn.ModuleList):
    """Projects backbone features to ``hidden_dim`` channels and adds extra levels.

    Level ``l < len(in_channels)``: 1x1 conv + GroupNorm(32) on backbone feature ``l``.
    Extra levels: 3x3 stride-2 conv + GroupNorm(32), the first on the last backbone
    feature, the next ones on the previous extra level (official DINO / Deformable DETR;
    submodules ``{l}.0`` conv and ``{l}.1`` norm).

    Args:
        in_channels: channels of each backbone feature, finest first.
        hidden_dim: output channels (divisible by 32).
        num_levels: total levels L >= len(in_channels).
    """

    def __init__(self, in_channels: List[int], hidden_dim: int, num_levels: int):
        if num_levels < len(in_channels):
            raise ValueError(
                f"InputProjection: num_levels={num_levels} is smaller than the {len(in_channels)} input maps"
            )
        if hidden_dim % 32 != 0:
            raise ValueError(f"InputProjection: hidden_dim={hidden_dim} must be divisible by 32 (GroupNorm(32, C))")
        projections = [
            nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim)) for c in in_channels
        ]
        extra_in = in_channels[-1]
        for _ in range(num_levels - len(in_channels)):
            projections.append(
                nn.Sequential(
                    nn.Conv2d(extra_in, hidden_dim, kernel_size=3, stride=2, padding=1),
                    nn.GroupNorm(32, hidden_dim),
                )
            )
            extra_in = hidden_dim
        super().__init__(projections)
        self.num_backbone_levels = len(in_channels)
        for proj in self:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

    def forward(self, features: List[torch.Tensor], image_mask: torch.Tensor):
        """
        Args:
            features: backbone maps (N, C_l, H_l, W_l), finest first.
            image_mask: (N, H, W) bool, True at padded pixels of the batched image.
        Returns:
            srcs: L maps (N, hidden_dim, H_l, W_l); masks: L bool masks (N, H_l, W_l).
        """
        if len(features) != self.num_backbone_levels:
            raise ValueError(f"InputProjection: expected {self.num_backbone_levels} features, got {len(features)}")
        srcs = [proj(f) for proj, f in zip(self, features)]
        last = features[-1]
        for proj in list(self)[self.num_backbone_levels :]:
            last = proj(last)
            srcs.append(last)
        masks = [downsample_mask(image_mask, s.shape[-2:]) for s in srcs]
        return srcs, masks
