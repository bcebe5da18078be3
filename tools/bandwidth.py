"""Memory-bandwidth floor of multi-scale deformable attention: the bytes the op must read and
write at least once, over the device's measured copy bandwidth. A kernel at the floor is
limited by memory traffic alone; the ratio ``measured / floor`` is how far it is from that."""

import statistics
import time
from typing import Optional

import torch

__all__ = ["ms_deform_attn_bytes", "value_rows_read", "median_seconds", "copy_bandwidth"]


def ms_deform_attn_bytes(
    batch: int,
    spatial: int,
    queries: int,
    heads: int,
    channels: int,
    levels: int,
    points: int,
    value_bytes: int,
    location_bytes: int,
    weight_bytes: int,
    rows_read: Optional[int] = None,
) -> tuple:
    """(forward, backward) bytes the op reads and writes once each.

    Forward reads the ``rows_read`` (n, s, m) rows of ``value`` (N, S, M, D) that bilinear
    sampling touches (all N * S * M when None; :func:`value_rows_read`), ``sampling_locations``
    (N, Lq, M, L, P, 2), ``attention_weights`` (N, Lq, M, L, P) and the int64 level shapes (L, 2)
    and starts (L,), and writes the output (N, Lq, M * D) in ``value``'s dtype. Backward reads
    ``grad_output`` and the same inputs and writes one whole gradient of each floating input.
    """
    value = batch * spatial * heads * channels * value_bytes
    value_read = value if rows_read is None else rows_read * channels * value_bytes
    output = batch * queries * heads * channels * value_bytes
    samples = batch * queries * heads * levels * points
    locations, weights = samples * 2 * location_bytes, samples * weight_bytes
    layout = levels * 3 * 8
    forward = value_read + locations + weights + layout + output
    backward = (output + value_read + locations + weights + layout) + (value + locations + weights)
    return forward, backward


@torch.no_grad()
def value_rows_read(
    spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, sampling_locations: torch.Tensor
) -> int:
    """How many distinct (n, s, m) rows of ``value`` the bilinear samples touch: the in-map
    corners of every sample (``align_corners=False``: pixel centres at (i + 0.5) / W)."""
    n, _, m, _, _, _ = sampling_locations.shape
    shapes = spatial_shapes.to(sampling_locations.device)
    h, w = shapes[:, 0].view(1, 1, 1, -1, 1), shapes[:, 1].view(1, 1, 1, -1, 1)
    start = level_start_index.to(sampling_locations.device).view(1, 1, 1, -1, 1)
    x = sampling_locations[..., 0].double() * w - 0.5
    y = sampling_locations[..., 1].double() * h - 0.5
    x0, y0 = x.floor().long(), y.floor().long()
    spatial = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    batch = torch.arange(n, device=x.device).view(-1, 1, 1, 1, 1)
    head = torch.arange(m, device=x.device).view(1, 1, -1, 1, 1)
    rows = []
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        cx, cy = x0 + dx, y0 + dy
        inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
        row = (batch * spatial + start + cy * w + cx) * m + head
        rows.append(row[inside])
    return int(torch.unique(torch.cat(rows)).numel())


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
