"""Exponential moving average (EMA) of the model weights, kept in the checkpoints and used
for evaluation when ``MODEL_EMA.ENABLED``."""

import contextlib
from typing import Dict

import torch
from detectron2.engine import HookBase
from torch import nn

__all__ = ["ModelEMA", "EMAHook"]


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class ModelEMA:
    """``ema = decay * ema + (1 - decay) * weight`` for every floating-point entry of the
    model's state dict; other entries (counters, int buffers) are copied.

    Has ``state_dict`` / ``load_state_dict`` so that a ``Checkpointer`` stores it
    (``checkpointer.add_checkpointable("model_ema", ema)``).
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"MODEL_EMA.DECAY must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow: Dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in _unwrap(model).state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for key, value in _unwrap(model).state_dict().items():
            ema = self.shadow[key]
            if ema.is_floating_point():
                ema.mul_(self.decay).add_(value.detach(), alpha=1.0 - self.decay)
            else:
                ema.copy_(value)

    @contextlib.contextmanager
    def apply_to(self, model: nn.Module):
        """Context in which ``model`` holds the EMA weights; its own weights come back after."""
        module = _unwrap(model)
        backup = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.shadow)
        try:
            yield model
        finally:
            module.load_state_dict(backup)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise KeyError(f"model_ema state does not match the model; differing keys: {sorted(missing)[:5]}")
        for key, value in state.items():
            self.shadow[key].copy_(value)


class EMAHook(HookBase):
    """Updates a :class:`ModelEMA` after every optimizer step."""

    def __init__(self, ema: ModelEMA):
        self.ema = ema

    def after_step(self):
        self.ema.update(self.trainer.model)
