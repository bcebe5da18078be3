"""Latency and peak-memory measurement of a Detectron2 model on the CPU or a GPU, and the name of
the machine they were measured on (tools/benchmark.py, tools/benchmark_ms_deform_attn.py)."""

import contextlib
import platform
import statistics
import time

import torch
from detectron2.utils.events import EventStorage


def machine_name(device) -> str:
    """The GPU's name, or the CPU model with the number of threads torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return f"{cpu}, {torch.get_num_threads()} threads"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_kib(field: str = "VmRSS") -> int:
    """A memory figure of this process from /proc/self/status (Linux), in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_memory(device):
    """Start a new peak: CUDA's allocator statistics, or the process's peak resident size (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _peak_mib(device):
    """Peak since the last reset: allocated GPU memory on CUDA, the process's resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return rss_kib("VmHWM") / 1024


def _timed(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def measure_inference(model, inputs, warmup=1, repeats=5, amp=False, amp_dtype=None):
    """Median latency (s) of ``model(inputs)`` in eval mode under no_grad, and peak memory (MiB).
    ``amp``: under autocast to ``amp_dtype`` (None: autocast's default for the device).

    On CUDA the memory is ``max_memory_allocated`` during the calls; on the CPU it is the peak resident
    set size of the whole process during the calls (weights and Python included), the number a user sees.
    """
    device = next(model.parameters()).device
    model.eval()
    reset_peak_memory(device)

    def step():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            model(inputs)

    times = _timed(step, device, warmup, repeats)
    return {"latency_s": statistics.median(times), "latency_all_s": times, "peak_mem_mib": _peak_mib(device)}


def measure_call(fn, args, device, warmup=1, repeats=5):
    """Median latency (s) of ``fn(*args)`` under no_grad and peak memory (MiB, as in
    :func:`measure_inference`); for models that are not Detectron2 modules (exported, compiled)."""
    reset_peak_memory(device)

    def step():
        with torch.no_grad():
            fn(*args)

    times = _timed(step, device, warmup, repeats)
    return {"latency_s": statistics.median(times), "latency_all_s": times, "peak_mem_mib": _peak_mib(device)}


def measure_training(model, inputs, warmup=1, repeats=3, amp=False, amp_dtype=None):
    """Median time (s) of one training iteration (forward, backward, AdamW step) and peak memory (MiB).
    ``amp`` as in :func:`measure_inference`; a grad scaler unless it is bfloat16.

    Args:
        inputs: list of dicts with "image" and "instances" (ground truth), as a Detectron2 train loader gives.
    """
    device = next(model.parameters()).device
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype != torch.bfloat16)
    reset_peak_memory(device)

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            losses = sum(model(inputs).values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses).backward()
        scaler.step(optimizer)
        scaler.update()

    with EventStorage(0):  # Detectron2 models log training metrics to an event storage
        times = _timed(step, device, warmup, repeats)
    return {"iter_s": statistics.median(times), "iter_all_s": times, "peak_mem_mib": _peak_mib(device)}
