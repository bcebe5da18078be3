"""The DINO transformer: deformable encoder, mixed query selection, deformable decoder."""

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from dino_detr.layers import MSDeformAttn

from .decoder import DeformableDecoder, DeformableDecoderLayer
from .encoder import DeformableEncoder, DeformableEncoderLayer, encoder_reference_points
from .query_selection import encoder_output_proposals, gather_queries, select_top_k

__all__ = ["DeformableTransformer", "valid_ratios"]


def valid_ratios(mask: torch.Tensor) -> torch.Tensor:
    """mask: (N, H, W) bool, True at padding -> (N, 2) valid fraction (w, h)."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / h
    valid_w = (~mask[:, 0, :]).sum(1).float() / w
    return torch.stack([valid_w, valid_h], -1)


class DeformableTransformer(nn.Module):
    """Encoder over the flattened multi-scale maps, query selection, decoder.

    Parameter names follow the official DINO ``transformer.*`` layout: ``encoder``,
    ``decoder``, ``level_embed``, ``tgt_embed``, ``enc_output``, ``enc_output_norm``,
    ``enc_out_class_embed``, ``enc_out_bbox_embed``.

    Args:
        enc_class_head / enc_box_head: encoder heads scoring each proposal.
        dec_box_heads: one box head per decoder layer (used for the refinement).
        encoder_cpu_chunk_size: tokens per slice of the encoder FFNs in CPU inference
            (:class:`DeformableEncoder`); 0 = all at once.
    """

    def __init__(
        self,
        enc_class_head: nn.Module,
        enc_box_head: nn.Module,
        dec_box_heads: nn.ModuleList,
        d_model: int = 256,
        nhead: int = 8,
        num_queries: int = 900,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        encoder_cpu_chunk_size: int = 0,
    ):
        super().__init__()
        self.d_model = d_model
        self.num_queries = num_queries
        self.encoder = DeformableEncoder(
            DeformableEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points),
            num_encoder_layers,
            encoder_cpu_chunk_size,
        )
        self.decoder = DeformableDecoder(
            DeformableDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, dec_n_points),
            num_decoder_layers,
            dec_box_heads,
            d_model,
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.tgt_embed = nn.Embedding(num_queries, d_model)
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self._reset_parameters()
        # Assigned after the Xavier pass so they keep their own initialisation (as official).
        self.enc_out_class_embed = enc_class_head
        self.enc_out_bbox_embed = enc_box_head

    def _reset_parameters(self):
        """Xavier for every matrix (decoder box heads excluded), Deformable DETR init for the
        deformable attentions, N(0, 1) level embedding."""
        heads = {id(p) for p in self.decoder.bbox_embed.parameters()}
        for p in self.parameters():
            if p.dim() > 1 and id(p) not in heads:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def flatten_levels(self, srcs: List[torch.Tensor], masks: List[torch.Tensor], pos_embeds: List[torch.Tensor]):
        """Concatenate the L levels into one token sequence.

        Returns:
            src (N, S, C), padding_mask (N, S), pos (N, S, C) with the level embedding added,
            spatial_shapes (L, 2) int64, level_start_index (L,), valid_ratios (N, L, 2).
        """
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        pos = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1) for lvl, p in enumerate(pos_embeds)], 1
        )
        # One scalar tensor per size (not torch.as_tensor of the sizes), so that the sizes of a
        # traced graph (torch.export, torch.compile) stay symbolic instead of being fixed.
        spatial_shapes = torch.stack(
            [torch.full((), d, dtype=torch.long, device=src.device) for s in srcs for d in s.shape[-2:]]
        ).view(-1, 2)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)
        return src, mask, pos, spatial_shapes, level_start_index, ratios

    def mixed_query_selection(self, memory: torch.Tensor, padding_mask: torch.Tensor, level_shapes: List[Tuple]):
        """Anchors = top-``num_queries`` encoder proposals (refined by the encoder box head),
        content queries = the learned ``tgt_embed``. ``level_shapes``: (H_l, W_l) of each level.

        Returns:
            tgt (N, K, C); anchors_unsig (N, K, 4) inverse-sigmoid boxes, detached;
            enc_logits (N, K, num_classes) and enc_boxes (N, K, 4) sigmoid, undetached.
        """
        output_memory, proposals = encoder_output_proposals(memory, padding_mask, level_shapes)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        logits = self.enc_out_class_embed(output_memory)
        topk = select_top_k(logits, self.num_queries)
        # The box head acts per token, so it runs on the selected tokens only.
        boxes_unsig = self.enc_out_bbox_embed(gather_queries(output_memory, topk)) + gather_queries(proposals, topk)
        tgt = self.tgt_embed.weight[None].expand(memory.shape[0], -1, -1)
        return tgt, boxes_unsig.detach(), gather_queries(logits, topk), boxes_unsig.sigmoid()

    def forward(
        self,
        srcs: List[torch.Tensor],
        masks: List[torch.Tensor],
        pos_embeds: List[torch.Tensor],
        dn_tgt: Optional[torch.Tensor] = None,
        dn_anchors_unsig: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> Dict[str, object]:
        """
        Args:
            srcs, masks, pos_embeds: L levels (N, C, H_l, W_l), (N, H_l, W_l), (N, C, H_l, W_l).
            dn_tgt: (N, P, C) denoising content queries, placed before the matching queries, or None.
            dn_anchors_unsig: (N, P, 4) their inverse-sigmoid boxes.
            attn_mask: (P + K, P + K) bool decoder self-attention mask, True = blocked.
        Returns:
            dict with ``hidden`` (list of D tensors (N, P + K, C)), ``boxes`` (list of D + 1
            tensors (N, P + K, 4)), ``enc_logits`` (N, K, classes), ``enc_boxes`` (N, K, 4).
        """
        src, padding_mask, pos, spatial_shapes, level_start_index, ratios = self.flatten_levels(srcs, masks, pos_embeds)
        # Without padding (e.g. one image, or equal sizes) the attentions skip masking altogether.
        # Traced graphs (torch.compile, torch.export) always mask: the test reads data, and
        # masking nothing gives the same result.
        attn_padding_mask = padding_mask
        if not torch.compiler.is_compiling() and not bool(padding_mask.any()):
            attn_padding_mask = None
        # Sizes as Python values (symbolic when traced), not read back from spatial_shapes.
        level_shapes = [tuple(s.shape[-2:]) for s in srcs]
        reference_points = encoder_reference_points(level_shapes, ratios)
        memory = self.encoder(src, pos, reference_points, spatial_shapes, level_start_index, attn_padding_mask)
        tgt, anchors_unsig, enc_logits, enc_boxes = self.mixed_query_selection(memory, padding_mask, level_shapes)
        if dn_tgt is not None:
            tgt = torch.cat([dn_tgt, tgt], 1)
            anchors_unsig = torch.cat([dn_anchors_unsig, anchors_unsig], 1)
        hidden, boxes = self.decoder(
            tgt,
            anchors_unsig.sigmoid(),
            memory,
            spatial_shapes,
            level_start_index,
            ratios,
            attn_padding_mask,
            attn_mask,
        )
        return {"hidden": hidden, "boxes": boxes, "enc_logits": enc_logits, "enc_boxes": enc_boxes}
