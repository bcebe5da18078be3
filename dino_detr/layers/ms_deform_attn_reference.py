"""Pure-PyTorch multi-scale deformable attention, built on ``grid_sample``.

Used by the tests as ground truth and as the fallback when the native extension
``dino_detr._C`` is not built. Semantics are those of Deformable DETR: bilinear
sampling with ``align_corners=False`` (pixel centres at ``(i + 0.5) / W``) and
zeros outside the feature map.
"""

import torch
import torch.nn.functional as F

__all__ = ["ms_deform_attn_reference"]


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention by ``grid_sample`` per level.

    Args:
        value: (N, S, M, D) flattened multi-scale values, S = sum_l H_l * W_l.
        spatial_shapes: (L, 2) int64 ``(H_l, W_l)`` of each level.
        level_start_index: (L,) offset of each level in S (unused: the levels are
            contiguous and in order, so the split by ``spatial_shapes`` is enough).
        sampling_locations: (N, Lq, M, L, P, 2) normalized ``(x, y)``.
        attention_weights: (N, Lq, M, L, P).
        (Mixed dtypes are computed in the widest of them.)

    Returns:
        (N, Lq, M * D) with ``value``'s dtype.
    """
    del level_start_index
    dtype = torch.promote_types(value.dtype, torch.promote_types(sampling_locations.dtype, attention_weights.dtype))
    out_dtype = value.dtype
    value, sampling_locations, attention_weights = (t.to(dtype) for t in (value, sampling_locations, attention_weights))
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_per_level = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        v = value_per_level[level].permute(0, 2, 3, 1).reshape(n * m, d, int(h), int(w))
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (N*M, D, Lq, P)
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * num_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (N*M, D, Lq)
    return out.view(n, m * d, lq).transpose(1, 2).contiguous().to(out_dtype)
