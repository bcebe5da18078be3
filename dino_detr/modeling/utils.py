"""Small building blocks shared by the DINO modules."""

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MLP", "inverse_sigmoid", "refine_box"]


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the DETR box head and
    DINO's ``ref_point_head``); submodule names ``layers.{i}`` as in the official code."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., input_dim) -> (..., output_dim)"""
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """logit of ``x`` clamped to [0, 1], with both ``x`` and ``1 - x`` floored at ``eps``
    (the official DINO convention; keeps noised and proposal boxes finite)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def refine_box(delta: torch.Tensor, reference: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Box refinement of Deformable DETR / DINO: ``sigmoid(delta + inverse_sigmoid(reference, eps))``.

    Args:
        delta: (..., 4) unnormalized offsets predicted by a box head.
        reference: (..., 4) normalized cxcywh boxes being refined.
        eps: floor of :func:`inverse_sigmoid`.
    Returns:
        (..., 4) refined normalized cxcywh boxes.
    """
    return (delta + inverse_sigmoid(reference, eps)).sigmoid()
