from .flops import MSDA_OP_NAME, count_flops, ms_deform_attn_flop_jit
from .measure import measure_call, measure_inference, measure_training
from .published import PUBLISHED_AP

__all__ = [
    "MSDA_OP_NAME",
    "count_flops",
    "ms_deform_attn_flop_jit",
    "measure_call",
    "measure_inference",
    "measure_training",
    "PUBLISHED_AP",
]
