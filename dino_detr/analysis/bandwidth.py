"""Memory-bandwidth floor of multi-scale deformable attention: the bytes the op must read and
write at least once, over the device's measured copy bandwidth. A kernel at the floor is
limited by memory traffic alone; the ratio ``measured / floor`` is how far it is from that."""
import statistics
import time

import torch

__all__ = ["ms_deform_attn_bytes", "median_seconds", "copy_bandwidth"]


def ms_deform_attn_bytes(batch: int, spatial: int, queries: int, heads: int, channels: int, levels: int,
                         points: int, value_bytes: int, location_bytes: int, weight_bytes: int) -> tuple:
    """(forward, backward) bytes the op reads and writes once each.

    Forward reads ``value`` (N, S, M, D), ``sampling_locations`` (N, Lq, M, L, P, 2),
    ``attention_weights`` (N, Lq, M, L, P) and the int64 level shapes (L, 2) and starts (L,), and
    writes the output (N, Lq, M * D) in ``value``'s dtype. Backward reads ``grad_output`` and the
    forward's inputs and writes one gradient of each floating input. Every value element is
    counted as read once (the sampled positions cover the maps at DINO's shapes).
    """
    value = batch * spatial * heads * channels * value_bytes
    output = batch * queries * heads * channels * value_bytes
    samples = batch * queries * heads * levels * points
    locations, weights = samples * 2 * location_bytes, samples * weight_bytes
    layout = levels * 3 * 8
    forward = value + locations + weights + layout + output
    backward = (output + value + locations + weights + layout) + (value + locations + weights)
    return forward, backward


def median_seconds(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median time of ``fn()``: CUDA events on the GPU (no host overhead between launches),
    the wall clock around a synchronised call on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 2**30, repeats: int = 20) -> float:
    """Bytes per second of a device-to-device copy of ``nbytes`` (read + write counted)."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    target = torch.empty_like(source)
    seconds = median_seconds(lambda: target.copy_(source), device, repeats, warmup=2)
    return 2 * nbytes / seconds
