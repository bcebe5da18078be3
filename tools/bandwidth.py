"""Memory-bandwidth floors of multi-scale deformable attention.

DRAM floor: the bytes the op must read and write at least once, over the device's measured copy
bandwidth. L2 floor: the bytes its bilinear corners pull through the caches (4 rows of D channels
per sample, :func:`gathered_bytes`), over the measured bandwidth of a random row gather from an
L2-resident table (:func:`gather_bandwidth`). At DINO's encoder shape ``value`` fits in an H100's
L2 and the gathers move ~18x the compulsory bytes, so the L2 floor is the one a kernel can near.
A kernel at a floor is limited by that traffic alone; ``measured / floor`` is how far it is."""

import statistics
import time
from typing import Optional

import torch

__all__ = [
    "ms_deform_attn_bytes",
    "value_rows_read",
    "median_seconds",
    "copy_bandwidth",
    "gathered_bytes",
    "gather_bandwidth",
]


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


def gathered_bytes(
    batch: int, queries: int, heads: int, channels: int, levels: int, points: int, value_bytes: int, backward: bool
) -> int:
    """Bytes the bilinear corners move through L1/L2: each sample reads 4 corner rows of D
    channels (forward); the backward reads them again and adds to the same rows of grad_value
    (an atomic read-modify-write in L2 per corner: counted once more), so forward+backward is 3x."""
    forward = batch * queries * heads * levels * points * 4 * channels * value_bytes
    return forward * (3 if backward else 1)


def gather_bandwidth(
    device: torch.device,
    row_bytes: int,
    table_bytes: int = 32 * 2**20,
    rows: int = 2**22,
    bag: int = 16,
    dtype: torch.dtype = torch.float32,
    repeats: int = 20,
) -> float:
    """Bytes per second of a strided gather: ``rows`` random rows of ``row_bytes`` from a table of
    ``table_bytes`` (kept in a GPU's L2 when it fits: 32 MiB of an H100's 50 MB), summed ``bag`` at
    a time with per-row weights (``embedding_bag``: MSDA's own pattern, 4 corners x points x levels
    weighted and summed per output row). Counts the rows read (the output is 1/bag of it)."""
    element = torch.empty((), dtype=dtype).element_size()
    width = max(row_bytes // element, 1)
    g = torch.Generator().manual_seed(0)
    table = torch.randn(max(table_bytes // (width * element), 1), width, generator=g).to(device, dtype)
    index = torch.randint(0, table.shape[0], (rows // bag, bag), generator=g).to(device)
    weights = torch.rand(index.shape, generator=g).to(device, dtype)

    def gather():
        return torch.nn.functional.embedding_bag(index, table, per_sample_weights=weights, mode="sum")

    seconds = median_seconds(gather, device, repeats, warmup=2)
    return index.numel() * width * element / seconds
