"""The multi-scale deformable attention module of Deformable DETR, used by DINO."""

import math

import torch
from torch import nn

from .ms_deform_attn import ms_deform_attn

__all__ = ["MSDeformAttn"]


def _per_point(x: torch.Tensor, num_points: int) -> torch.Tensor:
    """(..., L, 1, 2) -> (..., L * num_points * 2): each level's pair repeated per point."""
    return x.expand(*x.shape[:-2], num_points, 2).reshape(*x.shape[:-3], -1)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    Each query attends to ``num_points`` sampled positions per head and level, placed
    around its reference point by learned offsets, with softmax-normalized weights
    over all ``num_levels * num_points`` samples of a head.

    Args:
        embed_dim: channel count C of queries, values and output.
        num_heads: attention heads M (C must be divisible by M).
        num_levels: feature levels L.
        num_points: sampling points P per head and level.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"MSDeformAttn: embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self):
        """Deformable DETR initialisation: head ``h`` starts with its P points on the ray at
        angle ``2*pi*h/M`` (normalized to the unit square's border), point ``p`` at distance
        ``p + 1``; uniform attention; Xavier projections."""
        m, l, p = self.num_heads, self.num_levels, self.num_points
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(m, dtype=torch.float32) * (2.0 * math.pi / m)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        distances = torch.arange(1, p + 1, dtype=torch.float32).view(1, 1, p, 1)
        grid = directions.view(m, 1, 1, 2) * distances  # (M, 1, P, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.expand(m, l, p, 2).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (N, Lq, C).
            reference_points: (N, Lq, L, 2) normalized ``(x, y)`` points, or (N, Lq, L, 4)
                normalized ``(cx, cy, w, h)`` boxes (offsets then scale with the box size).
            value: (N, S, C) flattened multi-scale features, S = sum_l H_l * W_l.
            spatial_shapes: (L, 2) int64 ``(H_l, W_l)``.
            level_start_index: (L,) int64 start of each level in S.
            padding_mask: (N, S) bool, True at padded positions (their values are zeroed), or None.

        Returns:
            (N, Lq, C)
        """
        n, num_queries, _ = self._check_inputs(query, reference_points, value, padding_mask)
        m, l, p = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value)
        if padding_mask is not None:
            value.masked_fill_(padding_mask[..., None], 0.0)  # in place: value_proj's output is ours
        value = value.view(n, value.shape[1], m, self.embed_dim // m)
        offsets = self.sampling_offsets(query)
        weights = self.attention_weights(query).view(n, num_queries, m, l * p).softmax(-1)
        weights = weights.view(n, num_queries, m, l, p)
        # Sampling locations: reference + offsets * scale. Broadcasting only over the heads
        # (the P points of a level share reference and scale) keeps the inner run L*P*2 long.
        # Locations and weights in float32 at least (under autocast too): half precision would
        # quantize the sampling positions (~0.08 px at W=167). value may stay half on CUDA, and on the
        # CPU where no gradient is needed (the CPU kernel reads it as stored; its backward is float32).
        loc_dtype = torch.promote_types(torch.promote_types(offsets.dtype, weights.dtype), torch.float32)
        needs_grad = torch.is_grad_enabled() and value.requires_grad
        half_value = value.dtype in (torch.float16, torch.bfloat16) and (value.device.type == "cuda" or not needs_grad)
        value_dtype = value.dtype if half_value else torch.promote_types(value.dtype, loc_dtype)
        refs = reference_points[:, :, None, :, None, :2]  # (N, Lq, 1, L, 1, 2)
        if reference_points.shape[-1] == 2:
            scale = (1.0 / spatial_shapes.flip(-1).to(loc_dtype))[:, None, :]  # (L, 1, 2): 1 / (W, H)
        else:
            scale = reference_points[:, :, None, :, None, 2:] * (0.5 / p)  # half the box size / P
        locations = torch.addcmul(  # autocast keeps addcmul in its inputs' (float32) type
            _per_point(refs, p).to(loc_dtype),
            offsets.view(n, num_queries, m, l * p * 2).to(loc_dtype),
            _per_point(scale, p).to(loc_dtype),
        ).view(n, num_queries, m, l, p, 2)
        out = ms_deform_attn(value.to(value_dtype), spatial_shapes, level_start_index, locations, weights.to(loc_dtype))
        return self.output_proj(out.to(query.dtype))

    def _check_inputs(self, query, reference_points, value, padding_mask):
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(f"MSDeformAttn: query must be (N, Lq, {self.embed_dim}), got {tuple(query.shape)}")
        n, num_queries, _ = query.shape
        if value.dim() != 3 or value.shape[0] != n or value.shape[-1] != self.embed_dim:
            raise ValueError(f"MSDeformAttn: value must be (N={n}, S, {self.embed_dim}), got {tuple(value.shape)}")
        if (
            reference_points.dim() != 4
            or tuple(reference_points.shape[:3]) != (n, num_queries, self.num_levels)
            or reference_points.shape[-1] not in (2, 4)
        ):
            raise ValueError(
                f"MSDeformAttn: reference_points must be (N={n}, Lq={num_queries}, L={self.num_levels}, 2 or 4), "
                f"got {tuple(reference_points.shape)}"
            )
        if padding_mask is not None and (
            padding_mask.dtype != torch.bool or tuple(padding_mask.shape) != tuple(value.shape[:2])
        ):
            raise ValueError(
                f"MSDeformAttn: padding_mask must be bool (N, S)={tuple(value.shape[:2])}, "
                f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
            )
        return n, num_queries, value.shape[1]
