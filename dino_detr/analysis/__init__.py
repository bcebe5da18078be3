from .flops import MSDA_OP_NAME, count_flops, ms_deform_attn_flop_jit

__all__ = ["MSDA_OP_NAME", "count_flops", "ms_deform_attn_flop_jit"]
