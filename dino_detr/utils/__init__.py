"""Process-level helpers of the DINO tools."""
from .cpu_allocator import reuse_freed_cpu_memory

__all__ = ["reuse_freed_cpu_memory"]
