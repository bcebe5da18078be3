#!/usr/bin/env python
"""Benchmark of multi-scale deformable attention: the native op against the pure-PyTorch
``grid_sample`` reference, at DINO's shapes, and against the memory-bandwidth floors; on the
GPU also every CUDA kernel variant side by side (``--variants all``) and the original
Deformable-DETR kernel (``--peer-src``).

Cases: the encoder (every token of an H x W image's 4-scale maps, strides 8 to 64, queries
them all; default 800x1216) and the decoder (1100 queries = 900 matching + 200 denoising),
M=8 heads, D=32, P=4, forward and forward+backward. Each measurement runs in a fresh process
so that its peak memory (CPU: growth of the resident size over the inputs; CUDA:
max_memory_allocated) is its own; times are medians (CUDA events on the GPU). The DRAM floor
is the bytes the op must read and write once (the value rows its samples touch, every other
input and output whole) over the measured device copy bandwidth; the L2 floor is the bytes its
bilinear corners gather (4 rows of D channels per sample; 3x that forward+backward) over the
measured bandwidth of a random gather of such rows from an L2-sized table (tools/bandwidth.py).

Kernel variants (``--variants all`` or names; CUDA only): each is forced in turn
(``force_kernel``, as ``DINO_DETR_MSDA_KERNEL``) in the process that measures the native op, interleaved, and
reported as its time and speed-up over ``baseline``. ``--peer-src PATH`` (CUDA, float32): the
``models/ops`` folder of a Deformable-DETR checkout (github.com/fundamentalvision/Deformable-DETR,
e.g. fetched into an ignored folder such as ``build/peer/Deformable-DETR``), built for the
comparison only at run time (torch.utils.cpp_extension.load, a few compatibility edits for
today's torch applied to a temporary copy; see ``peer_sources``), never part of this repository.

    python tools/benchmark_ms_deform_attn.py [--device cpu|cuda] [--dtype float16] [--size 800 1333]
        [--cases encoder decoder] [--batches 1 2] [--threads 2] [--variants all] [--peer-src PATH]
        [--json out.json] [--markdown out.md]
"""

import argparse
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

STRIDES = (8, 16, 32, 64)
DECODER_QUERIES = 1100  # 900 matching + 200 denoising queries
HEADS, CHANNELS, POINTS = 8, 32, 4
KERNELS = ("baseline", "vectorized", "deterministic")  # DINO_DETR_MSDA_KERNEL names
PEER_IM2COL_STEP = 64

# Edits that let the 2020 Deformable-DETR sources build against today's torch (removed APIs);
# applied to a temporary copy, never to the checkout.
PEER_COMPAT_EDITS = (
    ("#include <THC/THCAtomics.cuh>", ""),
    (".type().is_cuda()", ".is_cuda()"),
    ("AT_DISPATCH_FLOATING_TYPES(value.type(),", "AT_DISPATCH_FLOATING_TYPES(value.scalar_type(),"),
    (".data<", ".data_ptr<"),
    ("AT_ASSERTM(", "TORCH_CHECK("),
)


def peer_sources(src: str, work: str) -> list:
    """Copies a Deformable-DETR ``models/ops`` folder (or its ``src``) into ``work``, applies
    PEER_COMPAT_EDITS, and returns the sources to build (vision.cpp, the CPU and CUDA files)."""
    src = os.path.join(src, "src") if os.path.isdir(os.path.join(src, "src")) else src
    if not os.path.exists(os.path.join(src, "vision.cpp")):
        raise FileNotFoundError(f"--peer-src {src}: no vision.cpp (expected Deformable-DETR's models/ops)")
    target = os.path.join(work, "src")
    shutil.copytree(src, target, dirs_exist_ok=True)
    sources = []
    for root, _, files in os.walk(target):
        for name in sorted(files):
            path = os.path.join(root, name)
            if name.endswith((".cpp", ".cu", ".cuh", ".h")):
                with open(path) as f:
                    code = f.read()
                for old, new in PEER_COMPAT_EDITS:
                    code = code.replace(old, new)
                with open(path, "w") as f:
                    f.write(code)
            if name.endswith((".cpp", ".cu")):
                sources.append(path)
    return sources


def load_peer(src: str):
    """The original Deformable-DETR op as ``fn(value, shapes, starts, loc, weights)`` with autograd."""
    import torch
    from torch.utils.cpp_extension import load

    work = tempfile.mkdtemp(prefix="msda_peer_")
    # ATen/cuda/CUDAContext.h (which the peer includes) needs the CUDA library headers, e.g.
    # cusparse.h: from the toolkit, or from the nvidia-* wheels that came with torch.
    try:
        import nvidia

        wheel_includes = sorted(
            inc for path in nvidia.__path__ for inc in glob.glob(os.path.join(path, "*", "include"))
        )
    except ImportError:
        wheel_includes = []
    module = load(
        "deformable_detr_msda_peer",
        peer_sources(src, work),
        extra_include_paths=[os.path.join(work, "src"), *wheel_includes],
        extra_cflags=["-DWITH_CUDA"],
        extra_cuda_cflags=["-DWITH_CUDA", "-DCUDA_HAS_FP16=1"],
        verbose=False,
    )

    class Peer(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, shapes, starts, loc, weights):
            ctx.save_for_backward(value, shapes, starts, loc, weights)
            return module.ms_deform_attn_forward(value, shapes, starts, loc, weights, PEER_IM2COL_STEP)

        @staticmethod
        def backward(ctx, grad_out):
            value, shapes, starts, loc, weights = ctx.saved_tensors
            grad_value, grad_loc, grad_weights = module.ms_deform_attn_backward(
                value, shapes, starts, loc, weights, grad_out.contiguous(), PEER_IM2COL_STEP
            )
            return grad_value, None, None, grad_loc, grad_weights

    return Peer.apply


def feature_levels(height: int, width: int) -> list:
    """(H_l, W_l) of an image's 4-scale maps: ceil(size / stride) (800x1333 -> (100, 167) ... (13, 21))."""
    return [(math.ceil(height / s), math.ceil(width / s)) for s in STRIDES]


def num_queries(case: str, levels: list) -> int:
    return sum(h * w for h, w in levels) if case == "encoder" else DECODER_QUERIES


def reference_points(case: str, batch: int, levels: list, generator):
    """(N, Lq, 4) normalized (cx, cy, w, h) around which each query samples, as in DINO:
    encoder tokens sample around their own pixel centre (a few pixels of every level), decoder
    queries inside their box."""
    import torch

    if case == "encoder":
        centres = []
        for h, w in levels:
            y, x = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
            centres.append(torch.stack([x.flatten(), y.flatten()], -1))
        centres = torch.cat(centres).expand(batch, -1, -1)
        size = torch.full_like(centres, 4.0 / levels[0][1])  # about 4 pixels of the finest level
        return torch.cat([centres, size], -1)
    centres = 0.1 + 0.8 * torch.rand(batch, DECODER_QUERIES, 2, generator=generator)
    size = 0.05 + 0.45 * torch.rand(batch, DECODER_QUERIES, 2, generator=generator)
    return torch.cat([centres, size], -1)


def make_inputs(case: str, batch: int, levels: list, device: str, dtype):
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)."""
    import torch

    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor(levels, dtype=torch.int64)
    sizes = shapes.prod(1)
    starts = torch.cumsum(sizes, 0) - sizes
    queries = num_queries(case, levels)
    value = torch.randn(batch, int(sizes.sum()), HEADS, CHANNELS, generator=g)
    boxes = reference_points(case, batch, levels, g)[:, :, None, None, None, :]
    offsets = torch.rand(batch, queries, HEADS, len(levels), POINTS, 2, generator=g) * 2 - 1
    loc = boxes[..., :2] + offsets * 0.5 * boxes[..., 2:]
    weights = torch.rand(batch, queries, HEADS, len(levels), POINTS, generator=g)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    return [
        t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        for t in (value, shapes, starts, loc, weights)
    ]


def run_case(
    impl: str,
    case: str,
    batch: int,
    backward: bool,
    levels: list,
    device: str,
    dtype_name: str,
    repeats: int,
    threads: int,
    kernels: tuple = (),
    peer_src: Optional[str] = None,
) -> dict:
    """One measurement in this process: median seconds, peak memory in MiB, and the bytes the
    op must move (forward, or forward + backward); for ``native`` on the GPU also each of
    ``kernels`` forced in turn (``kernel_seconds``) and the Deformable-DETR op (``peer_seconds``)."""
    import torch

    from dino_detr.layers import ms_deform_attn, ms_deform_attn_reference

    from bandwidth import gathered_bytes, median_seconds, ms_deform_attn_bytes, value_rows_read
    from measure import reset_peak_memory, rss_kib

    torch.set_num_threads(threads)
    dev = torch.device(device)
    fn = {"native": ms_deform_attn, "reference": ms_deform_attn_reference}[impl]
    inputs = make_inputs(case, batch, levels, device, getattr(torch, dtype_name))
    value, shapes, starts, loc, weights = inputs
    queries = num_queries(case, levels)
    if backward:
        for i in (0, 3, 4):
            inputs[i].requires_grad_()
        grad_out = torch.randn(batch, queries, HEADS * CHANNELS, device=device, dtype=value.dtype)

    def step(op=fn):
        out = op(*inputs)
        if backward:
            torch.autograd.grad(out, (inputs[0], inputs[3], inputs[4]), grad_out)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_memory(dev)
        base = rss_kib("VmRSS")
    step()  # warm-up (its peak memory is the one reported)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (rss_kib("VmHWM") - base) / 1024
    forward_bytes, backward_bytes = ms_deform_attn_bytes(
        batch,
        value.shape[1],
        queries,
        HEADS,
        CHANNELS,
        len(levels),
        POINTS,
        value.element_size(),
        loc.element_size(),
        weights.element_size(),
        value_rows_read(shapes, starts, loc),
    )
    result = {
        "impl": impl,
        "case": case,
        "batch": batch,
        "backward": backward,
        "seconds": median_seconds(step, dev, repeats, warmup=0),
        "peak_mib": peak,
        "bytes": forward_bytes + (backward_bytes if backward else 0),
        "gathered_bytes": gathered_bytes(
            batch, queries, HEADS, CHANNELS, len(levels), POINTS, value.element_size(), backward
        ),
    }
    if impl == "native" and device == "cuda":
        result["kernel_seconds"] = time_kernels(step, dev, kernels, repeats)
        if peer_src and dtype_name == "float32":
            peer = load_peer(peer_src)
            result["peer_seconds"] = median_seconds(lambda: step(peer), dev, repeats, warmup=1)
    return result


def variant_names(requested: list) -> tuple:
    """``--variants``: [] (none), ["all"], or kernel names (``baseline`` first: the ratios' base)."""
    names = list(KERNELS) if requested == ["all"] else list(requested)
    unknown = sorted(set(names) - set(KERNELS))
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; use all or names from {', '.join(KERNELS)}")
    return tuple(["baseline"] * bool(names) + [n for n in names if n != "baseline"])


def kernel_columns(native: dict) -> dict:
    """Row columns of the variants and the peer: ms and speed-up over the baseline kernel."""
    columns = {}
    kernels = native.get("kernel_seconds", {})
    for name, seconds in kernels.items():
        columns[f"kernel_{name}_ms"] = 1e3 * seconds
        columns[f"kernel_{name}_speedup"] = kernels["baseline"] / seconds
    if "peer_seconds" in native:
        columns["peer_ms"] = 1e3 * native["peer_seconds"]
        columns["native_speedup_over_peer"] = native["peer_seconds"] / native["seconds"]
        for name, seconds in kernels.items():
            columns[f"kernel_{name}_speedup_over_peer"] = native["peer_seconds"] / seconds
    return columns


def time_kernels(step, device, kernels, repeats: int, rounds: int = 3) -> dict:
    """Median seconds of ``step`` with each kernel variant forced, interleaved over ``rounds``
    (so that clock and cache drift touch every variant alike)."""
    import statistics

    from dino_detr.layers.ms_deform_attn_kernels import force_kernel

    from bandwidth import median_seconds

    previous = force_kernel("auto")
    times = {name: [] for name in kernels}
    try:
        for _ in range(rounds):
            for name in kernels:
                force_kernel(name)
                times[name].append(median_seconds(step, device, max(repeats // rounds, 1), warmup=1))
    finally:
        force_kernel(previous)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=[800, 1216],
        metavar=("H", "W"),
        help="image size whose feature maps the op reads (default 800 1216)",
    )
    parser.add_argument("--cases", nargs="+", default=["encoder", "decoder"], choices=["encoder", "decoder"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--copy-mib", type=int, default=1024, help="buffer of the copy-bandwidth measurement (MiB)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[],
        metavar="NAME",
        help=f"CUDA kernel variants to time side by side: all, or names from {', '.join(KERNELS)}",
    )
    parser.add_argument("--peer-src", help="Deformable-DETR's models/ops folder: its CUDA op as a peer (float32)")
    parser.add_argument("--gather-mib", type=int, default=32, help="table of the L2 gather measurement (MiB)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--markdown", help="write the Markdown table here")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one measurement, JSON on stdout
    args = parser.parse_args()
    levels = feature_levels(*args.size)
    kernels = variant_names(args.variants)
    if args.device != "cuda":
        kernels, args.peer_src = (), None  # the variants and the peer are CUDA kernels

    if args.case:
        impl, case, batch, backward = args.case.split(":")
        print(
            json.dumps(
                run_case(
                    impl,
                    case,
                    int(batch),
                    backward == "1",
                    levels,
                    args.device,
                    args.dtype,
                    args.repeats,
                    args.threads,
                    kernels,
                    args.peer_src,
                )
            )
        )
        return

    import torch

    from bandwidth import copy_bandwidth, gather_bandwidth

    torch.set_num_threads(args.threads)
    bandwidth = copy_bandwidth(torch.device(args.device), args.copy_mib * 2**20)
    dtype = getattr(torch, args.dtype)
    row_bytes = CHANNELS * torch.empty((), dtype=dtype).element_size()
    l2_bandwidth = gather_bandwidth(torch.device(args.device), row_bytes, args.gather_mib * 2**20, dtype=dtype)
    rows = []
    for case in args.cases:
        for batch in args.batches:
            for backward in (False, True):
                result = {}
                for impl in ("native", "reference"):
                    cmd = [
                        sys.executable,
                        __file__,
                        "--case",
                        f"{impl}:{case}:{batch}:{int(backward)}",
                        "--device",
                        args.device,
                        "--dtype",
                        args.dtype,
                        "--threads",
                        str(args.threads),
                        "--repeats",
                        str(args.repeats),
                        "--size",
                        *map(str, args.size),
                        *(["--variants", *kernels] if kernels else []),
                        *(["--peer-src", args.peer_src] if args.peer_src else []),
                    ]
                    # Large blocks mmapped and unmapped on free: the resident size then follows the
                    # tensors alive, and the reset peak measures what this op allocates.
                    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                    result[impl] = json.loads(out.strip().splitlines()[-1])
                native, reference = result["native"], result["reference"]
                row = {
                    "case": case,
                    "queries": num_queries(case, levels),
                    "batch": batch,
                    "pass": "forward+backward" if backward else "forward",
                    "native_ms": 1e3 * native["seconds"],
                    "reference_ms": 1e3 * reference["seconds"],
                    "native_peak_mib": native["peak_mib"],
                    "reference_peak_mib": reference["peak_mib"],
                    "bytes": native["bytes"],
                    "bandwidth_floor_ms": 1e3 * native["bytes"] / bandwidth,
                }
                row["speedup"] = row["reference_ms"] / row["native_ms"]
                row["native_over_floor"] = row["native_ms"] / row["bandwidth_floor_ms"]
                row["l2_floor_ms"] = 1e3 * native["gathered_bytes"] / l2_bandwidth
                row["native_over_l2_floor"] = row["native_ms"] / row["l2_floor_ms"]
                row.update(kernel_columns(native))
                print(json.dumps(row), flush=True)
                rows.append(row)

    from measure import machine_name

    header = {
        "machine": machine_name(args.device),
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "size": args.size,
        "levels": levels,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "gather_bandwidth_gb_s": l2_bandwidth / 1e9,
        "peer": args.peer_src,
        "command": "python " + " ".join(sys.argv),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": header, "rows": rows}, f, indent=1)
    table = markdown(header, rows)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)


def markdown(header: dict, rows: list) -> str:
    lines = [
        f"MSDA benchmark on {header['machine']} ({header['device']}, {header['dtype']}, "
        f"{header['threads']} threads, torch {header['torch']}, median of {header['repeats']}; "
        f"image {header['size'][0]}x{header['size'][1]}, levels {header['levels']}; "
        f"device copy bandwidth {header['copy_bandwidth_gb_s']:.1f} GB/s).",
        f"Command: `{header['command']}`",
        "",
        "| case (queries) | batch | pass | native ms | reference ms | speed-up | native peak MiB | "
        "reference peak MiB | bandwidth floor ms | native / floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} ({r['queries']}) | {r['batch']} | {r['pass']} | {r['native_ms']:.3f} | "
            f"{r['reference_ms']:.3f} | **{r['speedup']:.1f}x** | {r['native_peak_mib']:.0f} | "
            f"{r['reference_peak_mib']:.0f} | {r['bandwidth_floor_ms']:.3f} | {r['native_over_floor']:.1f}x |"
        )
    lines += variant_table(header, rows)
    return "\n".join(lines) + "\n"


def variant_table(header: dict, rows: list) -> list:
    """Lines of the kernel-variant table (none when no variant was timed): each variant's ms and
    speed-up over the baseline kernel, the peer's, and the native op against the L2 floor."""
    names = [k[len("kernel_") : -len("_ms")] for k in rows[0] if k.startswith("kernel_") and k.endswith("_ms")]
    peer = any("peer_ms" in r for r in rows)
    if not names and not peer and header["device"] != "cuda":
        return []
    lines = [
        "",
        f"Kernel variants (ms, and speed-up over `baseline`), L2 gather bandwidth "
        f"{header['gather_bandwidth_gb_s']:.0f} GB/s" + (", peer: original Deformable-DETR kernel" if peer else ""),
        "",
        "| case | batch | pass | "
        + " | ".join(names)
        + (" | peer ms | native / peer" if peer else "")
        + " | L2 floor ms | native / L2 floor |",
        "|---|---|---|" + "---|" * (len(names) + 2 * peer + 2),
    ]
    for r in rows:
        cells = [f"{r[f'kernel_{n}_ms']:.3f} ({r[f'kernel_{n}_speedup']:.2f}x)" for n in names]
        if peer:
            cells += [f"{r['peer_ms']:.3f}", f"{r['native_speedup_over_peer']:.2f}x"] if "peer_ms" in r else ["-", "-"]
        cells += [f"{r['l2_floor_ms']:.3f}", f"{r['native_over_l2_floor']:.1f}x"]
        lines.append(f"| {r['case']} | {r['batch']} | {r['pass']} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
