"""Inference precision (``MODEL.DINO.INFERENCE_DTYPE``): which dtype to run inference in, and the
model-independent steps of converting a model for it once (not per call, as autocast does).

* :func:`resolve_inference_dtype`: ``float32`` / ``bfloat16`` / ``float16``, or ``auto``: bfloat16 where
  the hardware computes it natively (a CPU with AMX-BF16 or AVX512-BF16, a CUDA GPU that supports it),
  float32 otherwise; ``auto`` logs its choice.
* :func:`fold_batch_norms`: Detectron2's ``Conv2d(norm=FrozenBatchNorm2d)`` (or an eval-mode ``BatchNorm2d``)
  becomes one convolution.
* :func:`cast_module`: a module's parameters and floating buffers to a dtype, except chosen submodules
  (the float32 islands), with its floating inputs cast to its dtype at the boundary.

:meth:`dino_detr.modeling.DinoDetr.prepare_for_inference` applies them to DINO.
"""

import logging
from typing import Iterable, Optional, Union

import torch
from torch import nn

__all__ = [
    "INFERENCE_DTYPES",
    "cast_inputs_on_entry",
    "cast_module",
    "fold_batch_norms",
    "native_bfloat16",
    "resolve_inference_dtype",
]

logger = logging.getLogger(__name__)

INFERENCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}


def native_bfloat16(device: Union[str, torch.device]) -> Optional[str]:
    """The hardware feature that computes bfloat16 natively on ``device`` ("AMX-BF16", "AVX512-BF16",
    or the GPU's name), or None when there is none (bfloat16 would be emulated, i.e. slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.cuda.get_device_name() if torch.cuda.is_bf16_supported(including_emulation=False) else None
    if device.type != "cpu":
        return None
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if capabilities.get("amx_bf16") or capabilities.get("amx_tile"):
        return "AMX-BF16"
    if capabilities.get("avx512_bf16"):
        return "AVX512-BF16"
    return None


def resolve_inference_dtype(name: str, device: Union[str, torch.device]) -> torch.dtype:
    """The dtype of ``MODEL.DINO.INFERENCE_DTYPE`` ``name`` on ``device``; ``auto`` picks bfloat16 where
    :func:`native_bfloat16` finds support and float32 otherwise, and logs why."""
    if name not in INFERENCE_DTYPES:
        raise ValueError(f"MODEL.DINO.INFERENCE_DTYPE must be one of {sorted(INFERENCE_DTYPES)}, got {name!r}")
    if name != "auto":
        return INFERENCE_DTYPES[name]
    feature = native_bfloat16(device)
    dtype = torch.bfloat16 if feature else torch.float32
    reason = (
        f"{torch.device(device)} computes bfloat16 natively ({feature})"
        if feature
        else (f"{torch.device(device)} has no native bfloat16 (no AMX-BF16 / AVX512-BF16 / bf16 GPU)")
    )
    logger.info(f"MODEL.DINO.INFERENCE_DTYPE=auto: inference in {str(dtype).removeprefix('torch.')}: {reason}")
    return dtype


@torch.no_grad()
def fold_batch_norms(module: nn.Module) -> int:
    """Folds every Detectron2 ``Conv2d`` whose ``norm`` is a ``FrozenBatchNorm2d`` (ResNet's convolutions), or
    a ``BatchNorm2d`` with running statistics (what it computes in eval mode), into one convolution with a
    bias: ``w' = w * s``, ``b' = b * s + (beta - mean * s)`` with ``s = gamma / sqrt(var + eps)``, computed
    in float64. In place, for inference; returns how many were folded."""
    from detectron2.layers import Conv2d, FrozenBatchNorm2d

    folded = 0
    for conv in module.modules():
        if not isinstance(conv, Conv2d):
            continue
        bn = conv.norm
        batch_norm = isinstance(bn, nn.BatchNorm2d) and bn.running_var is not None and bn.affine
        if not (isinstance(bn, FrozenBatchNorm2d) or batch_norm):
            continue
        scale = bn.weight.double() * (bn.running_var.double() + bn.eps).rsqrt()
        bias = bn.bias.double() - bn.running_mean.double() * scale
        if conv.bias is not None:
            bias = bias + conv.bias.double() * scale
        conv.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
        conv.norm = None
        folded += 1
    return folded


def cast_inputs_on_entry(module: nn.Module, dtype: torch.dtype, channels_last: bool = False) -> None:
    """Casts the floating tensor arguments of every call of ``module`` to ``dtype`` (4-d ones to
    channels-last memory when ``channels_last``): the boundary between two precisions."""

    def cast(x):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            return x
        x = x.to(dtype)
        return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x

    module.register_forward_pre_hook(lambda _, args: tuple(cast(a) for a in args))


@torch.no_grad()
def cast_module(module: nn.Module, dtype: torch.dtype, keep: Iterable[nn.Module] = ()) -> None:
    """Casts the floating parameters and buffers of ``module`` to ``dtype`` in place, except those of the
    modules in ``keep`` (and of their submodules), which keep their dtype."""
    kept = {id(t) for m in keep for t in (*m.parameters(), *m.buffers())}
    for sub in module.modules():
        for p in sub.parameters(recurse=False):
            if p.is_floating_point() and id(p) not in kept:
                p.data = p.data.to(dtype)
        for name, b in list(sub.named_buffers(recurse=False)):
            if b.is_floating_point() and id(b) not in kept:
                setattr(sub, name, b.to(dtype))
