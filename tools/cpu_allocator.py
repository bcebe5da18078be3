"""Keep large freed CPU blocks for reuse instead of returning them to the OS.

glibc serves big allocations (DINO's encoder activations are 20-165 MB each at 800x1216)
with fresh ``mmap`` pages and unmaps them on free, so every layer pays page faults and the
kernel's zero-fill on first touch. Raising the mmap and trim thresholds keeps those blocks
in the heap, as jemalloc / tcmalloc (recommended by PyTorch for CPU inference) would. The
process then keeps its peak memory resident; call this only in a process that runs the model.
"""

import ctypes
import ctypes.util
import logging

__all__ = ["reuse_freed_cpu_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MAX_THRESHOLD = 1 << 30  # glibc's dynamic threshold stops at 32 MiB; DINO's blocks are larger


def reuse_freed_cpu_memory() -> bool:
    """Tune glibc's malloc for tensor workloads; returns False (and changes nothing) elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _MAX_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, _MAX_THRESHOLD) == 1
    if not ok:
        logging.getLogger(__name__).warning("mallopt failed: freed CPU memory is returned to the OS as usual")
    return ok
