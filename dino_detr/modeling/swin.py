"""Swin Transformer backbone (Liu et al., arXiv 2103.14030) for Detectron2.

Parameter names follow the Swin detection backbone that the official DINO Swin-L checkpoints and the
ImageNet ``swin_*_22k.pth`` classifiers use (``patch_embed``, ``layers.{i}.blocks.{j}``,
``layers.{i}.downsample`` at the end of stage ``i``, one ``norm{i}`` per returned stage), so
converting them is a prefix change (``dino_detr/checkpoint``). Any input size works: the image is
padded to the patch size, every stage to its window size, and the shifted-window attention mask is
computed for each input size. Feature maps are NHWC inside, NCHW at the output.
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

__all__ = ["SwinTransformer", "build_swin_backbone", "shifted_window_mask"]

#: Additive attention logit between tokens of different regions of a shifted window (the
#: published models were trained with -100, not -inf; exp(-100) ~ 4e-44).
_MASKED = -100.0


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of ``window`` -> (B * H/w * W/w, w * w, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).transpose(2, 3)
    return x.reshape(-1, window * window, c)


def window_merge(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, w * w, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, c).transpose(2, 3)
    return x.reshape(-1, height, width, c)


def relative_position_index(window: int) -> torch.Tensor:
    """(w*w, w*w) int64: row of the (2w-1)^2 bias table for each (query, key) pair of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]) + (window - 1)  # (2, T, T), each in [0, 2w-2]
    return rel[0] * (2 * window - 1) + rel[1]


def shifted_window_mask(height: int, width: int, window: int, shift: int, device=None) -> torch.Tensor:
    """Attention mask of the shifted windows of a (height, width) map (multiples of ``window``).

    After a cyclic shift by ``shift``, a window at the bottom / right edge holds tokens from up to
    four regions that are not neighbours in the image; tokens attend only within their region.

    Returns:
        (nW, w*w, w*w) float: 0 within a region, -100 across regions.
    """
    region = torch.zeros(1, height, width, 1, device=device)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, (hs, ws) in enumerate((hs, ws) for hs in cuts for ws in cuts):
        region[:, hs, ws] = i
    ids = window_partition(region, window)[..., 0]  # (nW, T)
    different = ids[:, None, :] != ids[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill_(different, _MASKED)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window with a learned relative position bias.

    Args:
        dim: channels C; num_heads: heads (divides C); window: window side w.
    """

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"WindowAttention: width {dim} is not divisible by its {num_heads} heads")
        self.num_heads = num_heads
        self.window = window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Derived from the window size: not a weight (checkpoints that store it are checked on conversion).
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            x: (B * nW, T, C) tokens of nW windows per image, T = w * w.
            mask: (nW, T, T) additive mask of shifted windows, or None.
        Returns:
            (B * nW, T, C).
        """
        bw, t, c = x.shape
        q, k, v = self.qkv(x).view(bw, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(t, t, self.num_heads).permute(2, 0, 1)  # (heads, T, T)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        else:
            nw = mask.shape[0]
            q, k, v = (a.view(bw // nw, nw, self.num_heads, t, -1) for a in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=(bias + mask[:, None]).to(q.dtype))
            out = out.flatten(0, 1)
        return self.proj(out.transpose(1, 2).reshape(bw, t, c))


class SwinMlp(nn.Module):
    """fc1 -> GELU -> fc2 (the block's feed-forward network)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP, each residual with stochastic depth.

    Args:
        dim, num_heads, window: see :class:`WindowAttention`.
        shift: cyclic shift (0: regular windows, w // 2: shifted windows).
        mlp_ratio: MLP hidden width / dim.
        drop_path: stochastic depth probability of both residual branches.
    """

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwinMlp(dim, int(dim * mlp_ratio))
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            x: (B, H, W, C).
            mask: :func:`shifted_window_mask` of the padded map (used when ``shift > 0``).
        Returns:
            (B, H, W, C).
        """
        _, h, w, c = x.shape
        y = self.norm1(x)
        y = F.pad(y, (0, 0, 0, -w % self.window, 0, -h % self.window))  # zeros after the norm, bottom/right
        hp, wp = y.shape[1:3]
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, self.window), mask if self.shift else None)
        y = window_merge(y, self.window, hp, wp)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path(y[:, :h, :w])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods -> one token: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C), odd sides zero-padded."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """``depth`` blocks alternating regular and shifted windows, then an optional patch merging.

    Args:
        drop_paths: stochastic depth probability of each block.
        downsample: end with a :class:`PatchMerging`.
        use_checkpoint: recompute each block's activations in the backward pass (training memory).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        drop_paths: Sequence[float],
        downsample: bool,
        use_checkpoint: bool,
    ):
        super().__init__()
        self.window = window
        self.shift = window // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else self.shift, mlp_ratio, drop_paths[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, C) -> (the stage's output (B, H, W, C), the next stage's input)."""
        hp, wp = (-(-s // self.window) * self.window for s in x.shape[1:3])
        mask = shifted_window_mask(hp, wp, self.window, self.shift, x.device) if len(self.blocks) > 1 else None
        for block in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x, (x if self.downsample is None else self.downsample(x))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch`` x ``patch`` patches -> LayerNorm'ed tokens; the image is zero-padded
    at the bottom / right to a multiple of ``patch``. (B, C_in, H, W) -> (B, H/p, W/p, dim)."""

    def __init__(self, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % self.patch, 0, -h % self.patch))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinTransformer(Backbone):
    """Swin Transformer with feature maps ``swin{i}`` (stage ``i``, stride ``patch * 2**i``,
    ``embed_dim * 2**i`` channels, after its own LayerNorm ``norm{i}``).

    Args:
        embed_dim: channels of stage 0 (Swin-T 96, Swin-L 192).
        depths, num_heads: blocks and attention heads per stage (Swin-L (2, 2, 18, 2), (6, 12, 24, 48)).
        window: attention window side (Swin-L 384: 12).
        out_features: returned stages, e.g. ``["swin1", "swin2", "swin3"]``.
        patch_size: patch side of the embedding (4).
        in_chans: image channels.
        mlp_ratio: MLP width / stage width.
        drop_path_rate: stochastic depth, rising linearly from 0 to this over all blocks.
        freeze_at: 0 trains everything; 1 freezes the patch embedding; k >= 2 also stages
            0 .. k-2 (as ``MODEL.BACKBONE.FREEZE_AT`` does for the stem and res2.. of a ResNet).
            Frozen parts get no gradient and stay in eval mode (no stochastic depth).
        use_checkpoint: activation checkpointing of every block during training.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window: int,
        out_features: Sequence[str],
        patch_size: int = 4,
        in_chans: int = 3,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.2,
        freeze_at: int = 0,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"SwinTransformer: depths {list(depths)} and num_heads {list(num_heads)} differ in length")
        names = [f"swin{i}" for i in range(len(depths))]
        unknown = [f for f in out_features if f not in names]
        if unknown or not out_features:
            raise ValueError(
                f"SwinTransformer: out_features {list(out_features)}: expected a non-empty subset of {names}"
            )
        if not 0 <= freeze_at <= len(depths) + 1:
            raise ValueError(f"SwinTransformer: freeze_at={freeze_at} must be in [0, {len(depths) + 1}]")
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.layers = nn.ModuleList(
            SwinStage(
                dims[i],
                depths[i],
                num_heads[i],
                window,
                mlp_ratio,
                rates[sum(depths[:i]) : sum(depths[: i + 1])],
                downsample=i < len(depths) - 1,
                use_checkpoint=use_checkpoint,
            )
            for i in range(len(depths))
        )
        self.out_indices = sorted(names.index(f) for f in out_features)
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(dims[i]))
        self._out_features = [names[i] for i in self.out_indices]
        self._out_feature_channels = {names[i]: dims[i] for i in range(len(depths))}
        self._out_feature_strides = {names[i]: patch_size * 2**i for i in range(len(depths))}
        self.in_chans = in_chans
        self._frozen = self._freeze(freeze_at)

    def _freeze(self, freeze_at: int) -> List[nn.Module]:
        frozen = ([self.patch_embed] if freeze_at >= 1 else []) + list(self.layers[: max(freeze_at - 1, 0)])
        frozen += [getattr(self, f"norm{i}") for i in self.out_indices if i < freeze_at - 1]
        for module in frozen:
            module.requires_grad_(False)
        return frozen

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def forward(self, x: torch.Tensor):
        """(N, C_in, H, W) -> {``swin{i}``: (N, embed_dim * 2**i, ceil(H / stride_i), ceil(W / stride_i))}"""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"SwinTransformer expects (N, {self.in_chans}, H, W) images, got shape {tuple(x.shape)}")
        x = self.patch_embed(x)
        outputs = {}
        for i, stage in enumerate(self.layers):  # all stages run, so that every weight gets a gradient
            out, x = stage(x)
            if i in self.out_indices:
                outputs[f"swin{i}"] = getattr(self, f"norm{i}")(out).permute(0, 3, 1, 2).contiguous()
        return outputs

    def output_shape(self):
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_swin_backbone(cfg, input_shape: ShapeSpec):
    """Backbone ``"build_swin_backbone"`` configured by ``cfg.MODEL.SWIN`` and ``MODEL.BACKBONE.FREEZE_AT``."""
    s = cfg.MODEL.SWIN
    return SwinTransformer(
        embed_dim=s.EMBED_DIM,
        depths=s.DEPTHS,
        num_heads=s.NUM_HEADS,
        window=s.WINDOW_SIZE,
        out_features=s.OUT_FEATURES,
        patch_size=s.PATCH_SIZE,
        in_chans=input_shape.channels,
        mlp_ratio=s.MLP_RATIO,
        drop_path_rate=s.DROP_PATH_RATE,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        use_checkpoint=s.USE_CHECKPOINT,
    )
