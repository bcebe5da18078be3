"""Deformable decoder of DINO with iterative box refinement and look forward twice."""

import copy
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from dino_detr.layers import MSDeformAttn

from .position_encoding import box_sine_embedding
from .utils import MLP, refine_box

__all__ = ["DeformableDecoderLayer", "DeformableDecoder", "look_forward_twice"]


class DeformableDecoderLayer(nn.Module):
    """Self-attention among queries (``nn.MultiheadAttention`` with the denoising mask),
    deformable cross-attention to the encoder memory around each query's box, FFN; each
    followed by residual + LayerNorm. Names follow the official code (``self_attn``/``norm2``,
    ``cross_attn``/``norm1``, ``linear1``/``linear2``/``norm3``)."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.0, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.cross_attn = MSDeformAttn(embed_dim=d_model, num_heads=n_heads, num_levels=n_levels, num_points=n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt,
        query_pos,
        reference_points,
        memory,
        spatial_shapes,
        level_start_index,
        memory_padding_mask,
        self_attn_mask=None,
    ):
        """
        Args:
            tgt, query_pos: (N, Q, C) content queries and their position embedding.
            reference_points: (N, Q, L, 4) normalized cxcywh boxes per level.
            memory: (N, S, C); spatial_shapes: (L, 2); level_start_index: (L,);
            memory_padding_mask: (N, S) bool or None; self_attn_mask: (Q, Q) bool, True = blocked, or None.
        Returns:
            (N, Q, C)
        """
        q = k = tgt + query_pos
        attn = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attn))
        attn = self.cross_attn(
            tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index, memory_padding_mask
        )
        tgt = self.norm1(tgt + self.dropout1(attn))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt), inplace=True)))
        return self.norm3(tgt + self.dropout4(ffn))


def look_forward_twice(
    box_head: nn.Module, hidden: torch.Tensor, previous_box: torch.Tensor, eps: float = 1e-3
) -> torch.Tensor:
    """Box prediction of a decoder layer (DINO Sec. 3.5): layer ``i``'s delta refines the box
    of layer ``i-1`` *before* it was detached, so layer ``i``'s loss also updates layer ``i-1``.

    Args:
        box_head: maps (..., C) -> (..., 4) unnormalized delta.
        hidden: (N, Q, C) normalized output of layer ``i``.
        previous_box: (N, Q, 4) undetached refined box of layer ``i-1`` (the anchors for ``i=0``).
        eps: floor of the inverse sigmoid of ``previous_box`` (``MODEL.DINO.BOX_PREDICTION_EPS``).
    Returns:
        (N, Q, 4) normalized cxcywh.
    """
    return refine_box(box_head(hidden), previous_box, eps)


class DeformableDecoder(nn.Module):
    """DINO decoder: query position = ``ref_point_head`` (MLP) of the sine embedding of the
    current box; after each layer the box head refines the box, and the next layer receives
    it detached. Outputs are normalized by a shared LayerNorm ``norm``.

    Args:
        layer: the decoder layer to clone ``num_layers`` times.
        bbox_embed: one box head per layer (may be the same module repeated: shared heads).
        d_model: hidden size C.
    """

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int, bbox_embed: nn.ModuleList, d_model: int):
        super().__init__()
        if len(bbox_embed) != num_layers:
            raise ValueError(f"DeformableDecoder: need {num_layers} box heads, got {len(bbox_embed)}")
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.bbox_embed = bbox_embed
        self.d_model = d_model

    def forward(
        self,
        tgt: torch.Tensor,
        anchors: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        memory_padding_mask: torch.Tensor,
        self_attn_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """
        Args:
            tgt: (N, Q, C) content queries.
            anchors: (N, Q, 4) normalized cxcywh initial boxes (detached).
            memory: (N, S, C) encoder output; valid_ratios: (N, L, 2).
        Returns:
            hidden: ``num_layers`` normalized outputs (N, Q, C);
            boxes: ``num_layers + 1`` boxes (N, Q, 4): the anchors, then each layer's refined
            box, undetached (the input to the look-forward-twice prediction of the next layer).
        """
        output = tgt
        reference = anchors
        hidden, boxes = [], [anchors]
        level_scale = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # (N, 1, L, 4)
        for layer, box_head in zip(self.layers, self.bbox_embed):
            reference_input = reference[:, :, None] * level_scale  # (N, Q, L, 4)
            query_pos = self.ref_point_head(box_sine_embedding(reference_input[:, :, 0], self.d_model // 2))
            output = layer(
                output,
                query_pos,
                reference_input,
                memory,
                spatial_shapes,
                level_start_index,
                memory_padding_mask,
                self_attn_mask,
            )
            refined = refine_box(box_head(output), reference)
            boxes.append(refined)
            reference = refined.detach()
            hidden.append(self.norm(output))
        return hidden, boxes
