"""Which CUDA kernel multi-scale deformable attention runs, chosen by measurement.

The CUDA op has several kernels per stage (``dino_detr/csrc/cuda/ms_deform_attn_launch.cuh``;
designs in ``dino_detr/csrc/cuda/KERNELS.md``): forward ``baseline``, ``vectorized``; backward
``baseline``, ``vectorized``, ``deterministic``. Like cuDNN's benchmark mode, the first call of
each (stage, GPU, dtypes, shape bucket) times the candidates on its own inputs and keeps the
fastest for the process (and in the JSON file ``$DINO_DETR_MSDA_KERNEL_CACHE`` when set). The
baseline is always a candidate and keeps its place unless another is clearly faster, so the
choice never makes a call slower than the baseline (beyond timing noise). ``deterministic`` is
no candidate (it needs an int64 copy of ``value``): under
``torch.use_deterministic_algorithms(True)`` the backward runs it whatever was chosen.

``DINO_DETR_MSDA_KERNEL=name`` forces a variant on every stage that has one of that name (the
other stage runs its baseline); ``auto`` (the default) selects by timing.
"""

import functools
import json
import os
import statistics
from typing import Callable, Dict, Optional, Sequence

import torch

__all__ = ["KernelSelector", "cuda_timer", "select_kernel", "shape_bucket", "ENV_KERNEL", "ENV_CACHE"]

ENV_KERNEL = "DINO_DETR_MSDA_KERNEL"
ENV_CACHE = "DINO_DETR_MSDA_KERNEL_CACHE"
STAGES = ("forward", "backward")
NOT_CANDIDATES = ("deterministic",)  # chosen by torch.use_deterministic_algorithms, never by time
MARGIN = 0.97  # a variant replaces the baseline only when faster than 0.97x its time


def _pow2_ceil(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def shape_bucket(value: torch.Tensor, sampling_locations: torch.Tensor) -> tuple:
    """Calls that share a kernel choice: the same heads, channels, levels and points, and
    (batch * queries, S) in the same power-of-two ranges."""
    n, s, m, d = value.shape
    lq, levels, points = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    return (_pow2_ceil(n * lq), _pow2_ceil(s), m, d, levels, points)


def cuda_timer(run: Callable[[], object], repeats: int = 5) -> float:
    """Median seconds of ``run()`` by CUDA events, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


class KernelSelector:
    """Picks and remembers a kernel per (stage, key).

    Args:
        kernel_names: stage -> its kernel names, the baseline first.
        use_kernel: ``use_kernel(stage, name)`` makes the op run that kernel.
        timer: ``timer(run) -> seconds`` of one call of ``run`` (:func:`cuda_timer`).
        cache_file: a JSON file of earlier choices, read now and rewritten after each new one.
    """

    def __init__(
        self,
        kernel_names: Dict[str, Sequence[str]],
        use_kernel: Callable[[str, str], object],
        timer: Callable[[Callable[[], object]], float],
        cache_file: Optional[str] = None,
    ):
        self.kernel_names = {stage: list(names) for stage, names in kernel_names.items()}
        self.use_kernel = use_kernel
        self.timer = timer
        self.cache_file = cache_file
        self.choices: Dict[str, str] = {}
        if cache_file and os.path.exists(cache_file):
            with open(cache_file) as f:
                self.choices = json.load(f)

    def valid_names(self) -> list:
        return sorted({name for names in self.kernel_names.values() for name in names})

    def forced(self) -> Optional[str]:
        """The kernel ``$DINO_DETR_MSDA_KERNEL`` forces, None for ``auto``; ValueError for an unknown name."""
        name = os.environ.get(ENV_KERNEL, "auto")
        if name == "auto":
            return None
        if name not in self.valid_names():
            raise ValueError(
                f"{ENV_KERNEL}={name!r} names no ms_deform_attn CUDA kernel; use auto or one of "
                f"{', '.join(self.valid_names())}"
            )
        return name

    def select(self, stage: str, key: tuple, run: Callable[[], object]) -> str:
        """Makes ``stage`` run its kernel for ``key`` (timing the candidates with ``run`` the first
        time) and returns its name."""
        names = self.kernel_names[stage]
        forced = self.forced()
        if forced is not None:
            name = forced if forced in names else names[0]
        else:
            cache_key = json.dumps([stage, *key])
            name = self.choices.get(cache_key)
            if name not in names:
                name = self.choices[cache_key] = self._fastest(stage, run)
                self._save()
        self.use_kernel(stage, name)
        return name

    def _fastest(self, stage: str, run: Callable[[], object]) -> str:
        baseline, *others = [n for n in self.kernel_names[stage] if n not in NOT_CANDIDATES]
        seconds = {}
        for name in [baseline, *others]:
            self.use_kernel(stage, name)
            seconds[name] = self.timer(run)
        best = min(others, key=seconds.__getitem__, default=baseline)
        return best if seconds[best] < MARGIN * seconds[baseline] else baseline

    def _save(self):
        if self.cache_file:
            tmp = f"{self.cache_file}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.choices, f, indent=1, sort_keys=True)
            os.replace(tmp, self.cache_file)


@functools.cache
def _selector() -> Optional[KernelSelector]:
    """The process's selector, None when the built op has no kernel variants (no CUDA build)."""
    try:
        names = {stage: torch.ops.dino_detr.ms_deform_attn_kernel_names(stage) for stage in STAGES}
    except (AttributeError, RuntimeError):
        return None
    return KernelSelector(
        names, torch.ops.dino_detr.ms_deform_attn_use_kernel, cuda_timer, os.environ.get(ENV_CACHE) or None
    )


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def select_kernel(stage: str, value: torch.Tensor, sampling_locations: torch.Tensor, run: Callable[[], object]):
    """Before a CUDA call of ``stage`` on these inputs: makes the op run the chosen kernel (timing
    the candidates with ``run``, under no_grad, on the first call of its bucket). Does nothing
    while tracing, while a CUDA graph is captured, or without a CUDA build; the backward does not
    select under deterministic algorithms (the op runs its deterministic kernel)."""
    if torch.compiler.is_compiling() or (value.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    if stage == "backward" and torch.are_deterministic_algorithms_enabled():
        return
    selector = _selector()
    if selector is None:
        return
    key = (_device_name(value.device.index), str(value.dtype), str(sampling_locations.dtype)) + shape_bucket(
        value, sampling_locations
    )
    with torch.no_grad():
        selector.select(stage, key, run)
