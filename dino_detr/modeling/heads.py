"""Prediction heads of DINO (class: Linear, box: 3-layer MLP) and their initialisation."""

import copy
import math

from torch import nn

from .utils import MLP

__all__ = ["make_class_head", "make_box_head", "per_layer_heads"]


def make_class_head(hidden_dim: int, num_classes: int, prior_prob: float = 0.01) -> nn.Linear:
    """Linear classifier whose sigmoid starts at ``prior_prob`` for every class (focal-loss
    prior: bias ``-log((1 - p) / p)``)."""
    head = nn.Linear(hidden_dim, num_classes)
    nn.init.constant_(head.bias, -math.log((1 - prior_prob) / prior_prob))
    return head


def make_box_head(hidden_dim: int) -> MLP:
    """3-layer MLP predicting a (4,) box delta; last layer zero-initialised so refinement
    starts as the identity."""
    head = MLP(hidden_dim, hidden_dim, 4, 3)
    nn.init.zeros_(head.layers[-1].weight)
    nn.init.zeros_(head.layers[-1].bias)
    return head


def per_layer_heads(head: nn.Module, num_layers: int, share: bool) -> nn.ModuleList:
    """One head per decoder layer: ``head`` itself repeated when ``share`` (its parameters
    count once), else independent copies with the same initialisation."""
    return nn.ModuleList(head if share else copy.deepcopy(head) for _ in range(num_layers))
