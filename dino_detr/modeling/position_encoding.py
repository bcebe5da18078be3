"""Position embeddings of DINO: sine (separate H/W temperatures) or learned for the
feature maps, and the sine embedding of a box used for the decoder query position."""

import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSineHW", "PositionEmbeddingLearned", "box_sine_embedding", "build_position_embedding"]


def _sine_features(coords: torch.Tensor, num_feats: int, temperature: float) -> torch.Tensor:
    """(...,) coordinates -> (..., num_feats) interleaved sin/cos features, frequency
    ``temperature ** (2 * (i // 2) / num_feats)`` for feature ``i``."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = coords[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSineHW(nn.Module):
    """DINO's ``SineHW`` embedding of a padded feature map: cumulative valid-pixel
    coordinates (plus ``offset``), normalized to ``(0, 2*pi]`` over the valid region, then sine
    features with temperature ``temperature_h`` for y and ``temperature_w`` for x, y features first.

    Args:
        num_pos_feats: features per axis (half the hidden dim).
        offset: added to the 1-based pixel index before normalizing (0 in official DINO;
            detrex's models use -0.5, i.e. pixel centres).
    """

    def __init__(
        self, num_pos_feats: int = 128, temperature_h: float = 20, temperature_w: float = 20, offset: float = 0.0
    ):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature_h = temperature_h
        self.temperature_w = temperature_w
        self.offset = offset
        self.scale = 2 * math.pi

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask: (N, H, W) bool, True at padding -> (N, 2 * num_pos_feats, H, W)."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        eps = 1e-6
        y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        pos_y = _sine_features(y_embed, self.num_pos_feats, self.temperature_h)
        pos_x = _sine_features(x_embed, self.num_pos_feats, self.temperature_w)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute embedding: ``col_embed[x]`` then ``row_embed[y]`` (at most 50 each,
    as in DETR / DINO)."""

    def __init__(self, num_pos_feats: int = 128, max_size: int = 50):
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask: (N, H, W) -> (N, 2 * num_pos_feats, H, W)."""
        n, h, w = mask.shape
        max_size = self.row_embed.num_embeddings
        if h > max_size or w > max_size:
            raise ValueError(f"PositionEmbeddingLearned: feature map {h}x{w} exceeds the learned table size {max_size}")
        x_emb = self.col_embed(torch.arange(w, device=mask.device))
        y_emb = self.row_embed(torch.arange(h, device=mask.device))
        pos = torch.cat([x_emb[None].expand(h, w, -1), y_emb[:, None].expand(h, w, -1)], dim=-1)
        return pos.permute(2, 0, 1)[None].expand(n, -1, -1, -1)


def box_sine_embedding(boxes: torch.Tensor, num_feats: int = 128, temperature: float = 10000) -> torch.Tensor:
    """Sine embedding of normalized boxes for the decoder query position.

    Args:
        boxes: (..., 4) normalized cxcywh (or (..., 2) points).
    Returns:
        (..., 4 * num_feats) features ordered y, x, w, h (y, x for points), scale ``2*pi``.
    """
    feats = [_sine_features(boxes[..., i] * (2 * math.pi), num_feats, temperature) for i in range(boxes.shape[-1])]
    feats[0], feats[1] = feats[1], feats[0]
    return torch.cat(feats, dim=-1)


def build_position_embedding(
    kind: str, hidden_dim: int, temperature_h: float, temperature_w: float, offset: float = 0.0
) -> nn.Module:
    """``kind`` in {"sine", "learned"}; each axis gets ``hidden_dim // 2`` features."""
    if kind == "sine":
        return PositionEmbeddingSineHW(hidden_dim // 2, temperature_h, temperature_w, offset)
    if kind == "learned":
        return PositionEmbeddingLearned(hidden_dim // 2)
    raise ValueError(f"position embedding kind must be 'sine' or 'learned', got {kind!r}")
