"""Deformable transformer encoder of DINO (Deformable DETR's, post-norm)."""

import copy
from typing import Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from dino_detr.layers import MSDeformAttn

__all__ = ["DeformableEncoderLayer", "DeformableEncoder", "encoder_reference_points"]


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then FFN; each followed by residual +
    LayerNorm. Submodule names follow the official code (``self_attn``, ``norm1``,
    ``linear1``, ``linear2``, ``norm2``)."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.0, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.self_attn = MSDeformAttn(embed_dim=d_model, num_heads=n_heads, num_levels=n_levels, num_points=n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask, chunk_size=0):
        """
        Args:
            src, pos: (N, S, C) flattened features and their position (+ level) embedding.
            reference_points: (N, S, L, 2) normalized.
            spatial_shapes: (L, 2); level_start_index: (L,); padding_mask: (N, S) bool or None.
            chunk_size: when in (0, S), the FFN runs on slices of this many tokens, so that no
                (S, d_ffn) activation is held at once; the result is the same.
        Returns:
            (N, S, C)
        """
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        num_tokens = src.shape[1]
        if chunk_size <= 0 or chunk_size >= num_tokens:
            return self.feed_forward(src)
        out = torch.empty_like(src)
        for start in range(0, num_tokens, chunk_size):
            out[:, start : start + chunk_size] = self.feed_forward(src[:, start : start + chunk_size])
        return out

    def feed_forward(self, src):
        """(N, T, C) -> (N, T, C): FFN, residual, LayerNorm; each token on its own."""
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src), inplace=True)))
        return self.norm2(src + self.dropout3(ffn))


def encoder_reference_points(level_shapes: Sequence[Tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
    """Pixel-centre reference point of every encoder token, expressed for every level.

    Each token's centre is normalized by its own level's valid (unpadded) extent, then
    multiplied by each level's valid ratio (official Deformable DETR rule).

    Args:
        level_shapes: L pairs (H_l, W_l) (ints, or a traced graph's symbolic sizes).
        valid_ratios: (N, L, 2) valid fraction (w, h) per level.
    Returns:
        (N, S, L, 2) normalized (x, y).
    """
    points = []
    for lvl, (h, w) in enumerate(level_shapes):
        # arange, not linspace: the same values, and a traced graph keeps h and w symbolic.
        ref_y, ref_x = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=valid_ratios.device) + 0.5,
            torch.arange(w, dtype=torch.float32, device=valid_ratios.device) + 0.5,
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


class DeformableEncoder(nn.Module):
    """``num_layers`` independent copies of ``layer`` applied in sequence.

    Args:
        cpu_chunk_size: tokens per slice for CPU inference (no autograd); see
            :meth:`DeformableEncoderLayer.forward`. 0 processes all tokens at once.
    """

    def __init__(self, layer: DeformableEncoderLayer, num_layers: int, cpu_chunk_size: int = 0):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.cpu_chunk_size = cpu_chunk_size

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        """
        Args:
            src, pos: (N, S, C); reference_points: (N, S, L, 2) (:func:`encoder_reference_points`);
            spatial_shapes: (L, 2); level_start_index: (L,); padding_mask: (N, S) bool or None (no padding).
        Returns:
            memory (N, S, C)
        """
        # Slicing lowers peak memory. Autograd would keep every slice's activations anyway;
        # on a GPU, one large launch per op is the usual choice (not measured here: no GPU).
        # Traced graphs do not slice: a loop over a symbolic token count would fix the image size.
        sliceable = src.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        chunk_size = self.cpu_chunk_size if sliceable else 0
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask, chunk_size)
        return src
