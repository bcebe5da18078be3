#!/usr/bin/env python
"""Benchmark of multi-scale deformable attention: the native op against the pure-PyTorch
``grid_sample`` reference, at DINO's shapes.

Cases: the encoder (every token of an 800x1216 image's 4-scale maps queries them all) and
the decoder (1100 queries = 900 matching + 200 denoising), M=8 heads, D=32, P=4, batch 1
and 2, forward and forward+backward. Each measurement runs in a fresh process so that its
peak memory (CPU: growth of the resident size over the inputs; CUDA: max_memory_allocated)
is its own.

    python tools/benchmark_ms_deform_attn.py [--device cpu|cuda] [--threads 2] [--json out.json] [--markdown out.md]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

LEVELS = [(100, 152), (50, 76), (25, 38), (13, 19)]  # 800x1216 at strides 8, 16, 32, 64
CASES = {"encoder": sum(h * w for h, w in LEVELS), "decoder": 1100}
HEADS, CHANNELS, POINTS = 8, 32, 4


def machine_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores visible"


def reference_points(case: str, batch: int, generator):
    """(N, Lq, 4) normalized (cx, cy, w, h) around which each query samples, as in DINO:
    encoder tokens sample around their own pixel centre (a few pixels of every level), decoder
    queries inside their box."""
    import torch

    if case == "encoder":
        centres = []
        for h, w in LEVELS:
            y, x = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
            centres.append(torch.stack([x.flatten(), y.flatten()], -1))
        centres = torch.cat(centres).expand(batch, -1, -1)
        size = torch.full_like(centres, 4.0 / LEVELS[0][1])  # about 4 pixels of the finest level
        return torch.cat([centres, size], -1)
    centres = 0.1 + 0.8 * torch.rand(batch, CASES[case], 2, generator=generator)
    size = 0.05 + 0.45 * torch.rand(batch, CASES[case], 2, generator=generator)
    return torch.cat([centres, size], -1)


def make_inputs(case: str, batch: int, device: str, dtype):
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)."""
    import torch

    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor(LEVELS, dtype=torch.int64)
    sizes = shapes.prod(1)
    starts = torch.cumsum(sizes, 0) - sizes
    queries = CASES[case]
    value = torch.randn(batch, int(sizes.sum()), HEADS, CHANNELS, generator=g)
    boxes = reference_points(case, batch, g)[:, :, None, None, None, :]
    offsets = torch.rand(batch, queries, HEADS, len(LEVELS), POINTS, 2, generator=g) * 2 - 1
    loc = boxes[..., :2] + offsets * 0.5 * boxes[..., 2:]
    weights = torch.rand(batch, queries, HEADS, len(LEVELS), POINTS, generator=g)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    return [t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in
            (value, shapes, starts, loc, weights)]


def run_case(impl: str, case: str, batch: int, backward: bool, device: str, dtype_name: str, repeats: int,
             threads: int) -> dict:
    """One measurement in this process: median seconds and peak memory in MiB."""
    import torch

    from dino_detr.analysis.measure import reset_peak_memory, rss_kib
    from dino_detr.layers import ms_deform_attn, ms_deform_attn_reference

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    fn = {"native": ms_deform_attn, "reference": ms_deform_attn_reference}[impl]
    inputs = make_inputs(case, batch, device, dtype)
    if backward:
        for i in (0, 3, 4):
            inputs[i].requires_grad_()
        grad_out = torch.randn(batch, CASES[case], HEADS * CHANNELS, device=device, dtype=dtype)

    def step():
        out = fn(*inputs)
        if backward:
            torch.autograd.grad(out, (inputs[0], inputs[3], inputs[4]), grad_out)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_memory(torch.device("cpu"))
        base = rss_kib("VmRSS")
    step()  # warm-up (its peak memory is the one reported)
    sync()
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (rss_kib("VmHWM") - base) / 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return {"impl": impl, "case": case, "batch": batch, "backward": backward, "seconds": statistics.median(times),
            "peak_mib": peak}


def bandwidth_floor(case: str, batch: int, dtype_bytes: int) -> float:
    """Seconds the forward must take at least on this GPU: the bytes it must move (read
    values, locations, weights; write the output) over the measured device copy bandwidth."""
    import torch

    s = CASES["encoder"]
    q = CASES[case]
    elements = batch * (s * HEADS * CHANNELS + q * HEADS * len(LEVELS) * POINTS * 3 + q * HEADS * CHANNELS)
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    bandwidth = 2 * x.numel() * 10 / (time.perf_counter() - start)  # read + write
    return elements * dtype_bytes / bandwidth


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--markdown", help="write the Markdown table here")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one measurement, JSON on stdout
    args = parser.parse_args()

    if args.case:
        impl, case, batch, backward = args.case.split(":")
        print(json.dumps(run_case(impl, case, int(batch), backward == "1", args.device, args.dtype, args.repeats,
                                  args.threads)))
        return

    rows = []
    for case in CASES:
        for batch in args.batches:
            for backward in (False, True):
                result = {}
                for impl in ("native", "reference"):
                    cmd = [sys.executable, __file__, "--case", f"{impl}:{case}:{batch}:{int(backward)}",
                           "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
                           "--repeats", str(args.repeats)]
                    # Large blocks mmapped and unmapped on free: the resident size then follows the
                    # tensors alive, and the reset peak measures what this op allocates.
                    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                    result[impl] = json.loads(out.strip().splitlines()[-1])
                row = {
                    "case": case, "queries": CASES[case], "batch": batch,
                    "pass": "forward+backward" if backward else "forward",
                    "native_ms": 1e3 * result["native"]["seconds"], "reference_ms": 1e3 * result["reference"]["seconds"],
                    "native_peak_mib": result["native"]["peak_mib"],
                    "reference_peak_mib": result["reference"]["peak_mib"],
                }
                row["speedup"] = row["reference_ms"] / row["native_ms"]
                if args.device == "cuda" and not backward:
                    import torch

                    floor = bandwidth_floor(case, batch, torch.tensor([], dtype=getattr(torch, args.dtype)).element_size())
                    row["bandwidth_floor_ms"] = 1e3 * floor
                print(json.dumps(row), flush=True)
                rows.append(row)

    import torch

    header = {"machine": machine_name(args.device), "device": args.device, "dtype": args.dtype,
              "threads": args.threads, "torch": torch.__version__, "repeats": args.repeats,
              "command": "python " + " ".join(sys.argv)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": header, "rows": rows}, f, indent=1)
    table = markdown(header, rows)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)


def markdown(header: dict, rows: list) -> str:
    floor = any("bandwidth_floor_ms" in r for r in rows)
    lines = [
        f"MSDA benchmark on {header['machine']} ({header['device']}, {header['dtype']}, "
        f"{header['threads']} threads, torch {header['torch']}, median of {header['repeats']}).",
        f"Command: `{header['command']}`",
        "",
        "| case (queries) | batch | pass | native ms | reference ms | speed-up | native peak MiB | reference peak MiB |"
        + (" bandwidth floor ms |" if floor else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if floor else ""),
    ]
    for r in rows:
        line = (f"| {r['case']} ({r['queries']}) | {r['batch']} | {r['pass']} | {r['native_ms']:.1f} | "
                f"{r['reference_ms']:.1f} | **{r['speedup']:.1f}x** | {r['native_peak_mib']:.0f} | "
                f"{r['reference_peak_mib']:.0f} |")
        if floor:
            line += f" {r['bandwidth_floor_ms']:.3f} |" if "bandwidth_floor_ms" in r else " |"
        lines.append(line)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
