"""Layers of DINO: multi-scale deformable attention (native op, reference and module)."""

from .ms_deform_attn import ms_deform_attn, native_extension_available, use_reference_implementation
from .ms_deform_attn_module import MSDeformAttn
from .ms_deform_attn_reference import ms_deform_attn_reference

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "MSDeformAttn",
    "native_extension_available",
    "use_reference_implementation",
]
