"""Mixed query selection (DINO Sec. 3.4): anchors from the top-k encoder proposals,
content queries from a learned embedding."""

from typing import Sequence, Tuple

import torch

__all__ = ["encoder_output_proposals", "gather_queries", "select_top_k"]


def encoder_output_proposals(
    memory: torch.Tensor, padding_mask: torch.Tensor, level_shapes: Sequence[Tuple[int, int]]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One proposal per encoder token: a box centred on its pixel, of side ``0.05 * 2**level``.

    Centres are normalized by the level's valid (unpadded) extent. A proposal is valid when
    all four coordinates lie in (0.01, 0.99) and the token is not padding; invalid ones get an
    ``inf`` logit box and zeroed memory so they cannot be selected by a finite score.

    Args:
        memory: (N, S, C) encoder output.
        padding_mask: (N, S) bool, True at padding.
        level_shapes: L pairs (H_l, W_l) (ints, or a traced graph's symbolic sizes).
    Returns:
        memory: (N, S, C) with invalid tokens zeroed; proposals: (N, S, 4) inverse-sigmoid cxcywh.
    """
    n = memory.shape[0]
    proposals = []
    start = 0
    for lvl, (h, w) in enumerate(level_shapes):
        level_mask = padding_mask[:, start : start + h * w].view(n, h, w)
        valid_h = (~level_mask[:, :, 0]).sum(1)
        valid_w = (~level_mask[:, 0, :]).sum(1)
        grid_y, grid_x = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=memory.device),
            torch.arange(w, dtype=torch.float32, device=memory.device),
            indexing="ij",
        )
        grid = torch.stack([grid_x, grid_y], -1)  # (h, w, 2)
        scale = torch.stack([valid_w, valid_h], 1).view(n, 1, 1, 2)
        centers = (grid[None] + 0.5) / scale
        sizes = torch.full_like(centers, 0.05 * (2.0**lvl))
        proposals.append(torch.cat((centers, sizes), -1).view(n, -1, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    invalid = padding_mask.unsqueeze(-1) | ~valid
    proposals = proposals.masked_fill(invalid, float("inf"))
    memory = memory.masked_fill(invalid, 0.0)
    return memory, proposals


def gather_queries(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (N, S, D), index: (N, K) -> (N, K, D)."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def select_top_k(logits: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Indices of the ``num_queries`` tokens with the highest max class logit.

    Args:
        logits: (N, S, num_classes) encoder class logits of all tokens.
    Returns:
        (N, num_queries) int64.
    """
    if num_queries > logits.shape[1]:
        raise ValueError(
            f"MODEL.DINO.NUM_QUERIES={num_queries} exceeds the {logits.shape[1]} encoder tokens of this "
            "input; use fewer queries or larger images"
        )
    return torch.topk(logits.max(-1)[0], num_queries, dim=1)[1]
