"""Mixed-precision training loop (``SOLVER.AMP``) in float16 or bfloat16, on any device.

Detectron2 v0.6's ``AMPTrainer`` autocasts to float16 on CUDA only (``precision=`` came in
later versions); this loop is written against the ``SimpleTrainer`` API both share.
"""

import time

import torch
from detectron2.engine import SimpleTrainer

__all__ = ["AMP_PRECISIONS", "amp_precision", "MixedPrecisionTrainer"]

AMP_PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def amp_precision(cfg) -> torch.dtype:
    """The autocast dtype of ``cfg.SOLVER.AMP.PRECISION``; ``ValueError`` naming the key when it
    is unknown, or when AMP is enabled in bfloat16 on a GPU without bfloat16 (before Ampere)."""
    precision = cfg.SOLVER.AMP.PRECISION
    if precision not in AMP_PRECISIONS:
        raise ValueError(
            f"SOLVER.AMP.PRECISION must be one of {', '.join(map(repr, AMP_PRECISIONS))}, got {precision!r}"
        )
    dtype = AMP_PRECISIONS[precision]
    on_gpu = torch.device(cfg.MODEL.DEVICE).type == "cuda" and torch.cuda.is_available()
    if cfg.SOLVER.AMP.ENABLED and dtype == torch.bfloat16 and on_gpu and not torch.cuda.is_bf16_supported():
        major, minor = torch.cuda.get_device_capability()
        raise ValueError(
            f"SOLVER.AMP.PRECISION 'bfloat16' needs a GPU of compute capability 8.0 or newer; "
            f"{torch.cuda.get_device_name()} is {major}.{minor}: use 'float16'"
        )
    return dtype


class MixedPrecisionTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose forward runs under ``torch.autocast(device_type, precision)``.

    float16 scales the loss with a ``GradScaler`` (checkpointed as ``grad_scaler``; a step whose
    gradients overflowed is skipped and the scale lowered); bfloat16 has float32's range and
    steps directly.
    """

    def __init__(self, model, data_loader, optimizer, precision: torch.dtype, device_type: str):
        super().__init__(model, data_loader, optimizer)
        if precision not in AMP_PRECISIONS.values():
            raise ValueError(f"MixedPrecisionTrainer: precision must be float16 or bfloat16, got {precision}")
        self.precision = precision
        self.device_type = device_type
        self.grad_scaler = torch.amp.GradScaler(device_type) if precision == torch.float16 else None

    def run_step(self):
        assert self.model.training, "[MixedPrecisionTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with torch.autocast(self.device_type, dtype=self.precision):
            loss_dict = self.model(data)
            losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        if self.grad_scaler is None:
            losses.backward()
            self._write_metrics(loss_dict, data_time)
            self.optimizer.step()
        else:
            self.grad_scaler.scale(losses).backward()
            self._write_metrics(loss_dict, data_time)
            self.grad_scaler.step(self.optimizer)  # unscales first, so clipping sees true gradients
            self.grad_scaler.update()

    def state_dict(self):
        state = super().state_dict()
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # A run resumed in another precision (or from full precision) keeps its fresh scaler.
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
