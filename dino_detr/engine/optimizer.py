"""AdamW with a lower backbone learning rate and full-model gradient clipping (DINO)."""

from typing import Dict, List

import torch
from detectron2.solver.build import maybe_add_gradient_clipping
from torch import nn

from .nan_guard import check_finite_grad_norm

__all__ = ["add_full_model_clipping", "build_dino_optimizer", "dino_param_groups"]


def dino_param_groups(model: nn.Module, base_lr: float, backbone_multiplier: float, weight_decay: float) -> List[Dict]:
    """Two parameter groups: ``backbone.*`` at ``base_lr * backbone_multiplier``, the rest
    at ``base_lr``; both with ``weight_decay``. Frozen and shared parameters are listed once."""
    backbone, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (backbone if name.startswith("backbone.") else rest).append(param)
    groups = [{"params": rest, "lr": base_lr, "weight_decay": weight_decay}]
    if backbone:
        groups.append({"params": backbone, "lr": base_lr * backbone_multiplier, "weight_decay": weight_decay})
    return groups


def _with_full_model_clipping(optimizer_type: type, max_norm: float, norm_type: float, output_dir: str) -> type:
    """Subclass of ``optimizer_type`` whose ``step`` first scales all gradients together so
    their total ``norm_type`` norm is at most ``max_norm`` (``inf``: no clipping), and stops
    on a non-finite norm before touching the weights (naming the last checkpoint in ``output_dir``)."""

    class FullModelGradientClipping(optimizer_type):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            total_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            check_finite_grad_norm(total_norm, output_dir)
            return super().step(closure)

    FullModelGradientClipping.__name__ = f"{optimizer_type.__name__}WithFullModelGradientClipping"
    return FullModelGradientClipping


def add_full_model_clipping(
    optimizer: torch.optim.Optimizer, max_norm: float, norm_type: float = 2.0, output_dir: str = ""
) -> torch.optim.Optimizer:
    """``optimizer`` made to clip all gradients together at ``max_norm`` (``inf``: only the
    non-finite check) before each step, in place as Detectron2's ``maybe_add_gradient_clipping``
    does (LazyConfig training: ``train.clip_grad``)."""
    optimizer.__class__ = _with_full_model_clipping(type(optimizer), max_norm, norm_type, output_dir)
    return optimizer


def _can_fuse_adamw(cfg, groups: List[Dict]) -> bool:
    """Whether AdamW can run as one fused kernel per step (torch's ``fused=True``: the same update,
    ~5x faster than the per-tensor loop on the CPU): floating-point parameters on the CPU or CUDA,
    and no float16 ``GradScaler``, which would hand the fused step scaled gradients (the full-model
    clipping must see them unscaled)."""
    amp = cfg.SOLVER.AMP
    if amp.ENABLED and amp.PRECISION == "float16":
        return False
    params = [p for group in groups for p in group["params"]]
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def build_dino_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """``SOLVER.OPTIMIZER`` ("ADAMW", fused where :func:`_can_fuse_adamw`, or "SGD") over
    :func:`dino_param_groups`.

    ``SOLVER.CLIP_GRADIENTS`` with ``CLIP_TYPE: "full_model"`` clips the L2 (``NORM_TYPE``)
    norm of all gradients together at ``CLIP_VALUE``; "value" / "norm" use Detectron2's
    per-parameter clipping. A non-finite gradient norm always stops training.
    """
    s = cfg.SOLVER
    groups = dino_param_groups(model, s.BASE_LR, s.BACKBONE_MULTIPLIER, s.WEIGHT_DECAY)
    name = s.OPTIMIZER.upper()
    if name == "ADAMW":
        optimizer_type, kwargs = torch.optim.AdamW, {"fused": _can_fuse_adamw(cfg, groups)}
    elif name == "SGD":
        optimizer_type, kwargs = torch.optim.SGD, {"momentum": s.MOMENTUM, "nesterov": s.NESTEROV}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be 'ADAMW' or 'SGD', got {s.OPTIMIZER!r}")
    clip = s.CLIP_GRADIENTS
    full_model = clip.ENABLED and clip.CLIP_TYPE == "full_model"
    max_norm = clip.CLIP_VALUE if full_model else float("inf")
    optimizer_type = _with_full_model_clipping(optimizer_type, max_norm, clip.NORM_TYPE, cfg.OUTPUT_DIR)
    optimizer = optimizer_type(groups, lr=s.BASE_LR, **kwargs)
    if clip.ENABLED and not full_model:
        optimizer = maybe_add_gradient_clipping(cfg, optimizer)
    return optimizer
