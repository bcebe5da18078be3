"""FLOP counting with fvcore, including the multi-scale deformable attention op."""

from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

MSDA_OP_NAME = "dino_detr::ms_deform_attn"


def ms_deform_attn_flop_jit(inputs, outputs):
    """fvcore handle: one multiply-add per channel for each of the 4 bilinear corners and for the
    attention weight, for every (batch, query, head, level, point).

    inputs: value (N, S, M, D), spatial_shapes, level_start_index, sampling_locations (N, Lq, M, L, P, 2),
    attention_weights.
    """
    n, _, m, d = get_shape(inputs[0])
    _, lq, _, levels, points, _ = get_shape(inputs[3])
    return n * lq * m * levels * points * d * 5


def sdpa_flop_jit(inputs, outputs):
    """fvcore handle of ``scaled_dot_product_attention``: the two matrix products, q k^T and
    attn v, for every batch / head: prod(batch dims) * L * S * (E + Ev) multiply-adds.

    inputs: query (..., L, E), key (..., S, E), value (..., S, Ev), ...
    """
    q, v = get_shape(inputs[0]), get_shape(inputs[2])
    batch = 1
    for dim in q[:-2]:
        batch *= dim
    return batch * q[-2] * v[-2] * (q[-1] + v[-1])


class _ImageToTensors(nn.Module):
    """Adapts a Detectron2 model to ``image (C, H, W) -> tuple of tensors`` so that it can be traced.

    (Detectron2 v0.6's own ``TracingAdapter`` module imports caffe2, which recent PyTorch lacks.)
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        out = self.model([{"image": image}])[0]["instances"]
        return tuple(v.tensor if hasattr(v, "tensor") else v for v in out.get_fields().values())


def count_flops(model, image):
    """FLOPs (fvcore convention: one fused multiply-add = 1) of one eval-mode forward.

    Args:
        model: a Detectron2 detector returning ``[{"instances": Instances}]``.
        image: (C, H, W) input image tensor on the model's device.

    Returns:
        (total, {operator: flops}, {operator fvcore could not count: number of calls})
    """
    analysis = FlopCountAnalysis(_ImageToTensors(model).eval(), (image,))
    analysis.set_op_handle(MSDA_OP_NAME, ms_deform_attn_flop_jit)
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    return analysis.total(), dict(analysis.by_operator()), dict(analysis.unsupported_ops())
