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
other stage runs its baseline); ``auto`` (the default) selects by timing. Both variables are read
once, at the first CUDA call; :func:`force_kernel` changes the forced kernel later in the process.

Per call, :func:`run_selected` costs a dict lookup (the choice is memoised per stage, device,
dtypes and exact shapes) and calls into C++ only when the stage's kernel changes. The kernel
choice is process-global (in the op), so selection and launch hold one lock: a thread never
launches with a kernel another thread set in between, and two threads never time at once.
Calls that bypass :func:`run_selected` (graphs from ``torch.compile`` / ``torch.export``, a direct
``torch.ops.dino_detr`` call) run whichever kernel is set at their launch.
"""

import functools
import json
import os
import statistics
import threading
from typing import Callable, Dict, Optional, Sequence

import torch

from ..fileio import atomic_open

__all__ = [
    "KernelSelector",
    "cuda_timer",
    "force_kernel",
    "run_selected",
    "select_kernel",
    "shape_bucket",
    "ENV_KERNEL",
    "ENV_CACHE",
]

ENV_KERNEL = "DINO_DETR_MSDA_KERNEL"
ENV_CACHE = "DINO_DETR_MSDA_KERNEL_CACHE"
STAGES = ("forward", "backward")
NOT_CANDIDATES = ("deterministic",)  # chosen by torch.use_deterministic_algorithms, never by time
MARGIN = 0.97  # a variant replaces the baseline only when faster than 0.97x its time


def _pow2_ceil(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def _bucket(value_shape: Sequence[int], locations_shape: Sequence[int]) -> tuple:
    n, s, m, d = value_shape
    lq, levels, points = locations_shape[1], locations_shape[3], locations_shape[4]
    return (_pow2_ceil(n * lq), _pow2_ceil(s), m, d, levels, points)


def shape_bucket(value: torch.Tensor, sampling_locations: torch.Tensor) -> tuple:
    """Calls that share a kernel choice: the same heads, channels, levels and points, and
    (batch * queries, S) in the same power-of-two ranges."""
    return _bucket(value.shape, sampling_locations.shape)


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


def _read_cache(path: str) -> Dict[str, str]:
    """The choices in a cache file; ValueError naming ``$DINO_DETR_MSDA_KERNEL_CACHE`` for a file
    that is not one."""
    try:
        with open(path) as f:
            choices = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        choices = e
    if not isinstance(choices, dict) or not all(isinstance(v, str) for v in choices.values()):
        raise ValueError(
            f"{ENV_CACHE}={path!r} is not an ms_deform_attn kernel cache (a JSON object of kernel names): "
            f"{choices if isinstance(choices, Exception) else type(choices).__name__}; delete it or set "
            f"{ENV_CACHE} to another file"
        )
    return choices


class KernelSelector:
    """Picks and remembers a kernel per (stage, key); thread-safe (``lock`` guards its state).

    Args:
        kernel_names: stage -> its kernel names, the baseline first.
        use_kernel: ``use_kernel(stage, name)`` makes the op run that kernel.
        timer: ``timer(run) -> seconds`` of one call of ``run`` (:func:`cuda_timer`).
        cache_file: a JSON file of earlier choices, read now and rewritten (merged with the
            file's content then) after each new one.
        forced: a kernel name to run on every stage that has it, or ``"auto"`` to select by timing.
        describe: ``describe(key) -> tuple`` the key as stored in the cache file (JSON values).
    """

    def __init__(
        self,
        kernel_names: Dict[str, Sequence[str]],
        use_kernel: Callable[[str, str], object],
        timer: Callable[[Callable[[], object]], float],
        cache_file: Optional[str] = None,
        forced: str = "auto",
        describe: Callable[[tuple], tuple] = tuple,
    ):
        self.kernel_names = {stage: list(names) for stage, names in kernel_names.items()}
        self.use_kernel = use_kernel
        self.timer = timer
        self.cache_file = cache_file
        self.describe = describe
        self.lock = threading.RLock()
        self.choices: Dict[str, str] = _read_cache(cache_file) if cache_file and os.path.exists(cache_file) else {}
        self.memo: Dict[tuple, str] = {}  # (stage, key) -> kernel name
        self.current: Dict[str, str] = {}  # stage -> the kernel last set by use_kernel
        self.forced: Optional[str] = None
        self.force(forced)

    def valid_names(self) -> list:
        return sorted({name for names in self.kernel_names.values() for name in names})

    def force(self, name: str) -> str:
        """Forces kernel ``name`` (``"auto"``: select by timing); returns the previous setting.
        ValueError for an unknown name."""
        if name != "auto" and name not in self.valid_names():
            raise ValueError(
                f"{ENV_KERNEL}={name!r} names no ms_deform_attn CUDA kernel; use auto or one of "
                f"{', '.join(self.valid_names())}"
            )
        with self.lock:
            previous, self.forced = self.forced or "auto", None if name == "auto" else name
            self.memo.clear()
        return previous

    def select(self, stage: str, key: tuple, run: Callable[[], object]) -> str:
        """Makes ``stage`` run its kernel for ``key`` (timing the candidates with ``run``, under
        no_grad, the first time) and returns its name."""
        with self.lock:
            name = self.memo.get((stage, key))
            if name is None:
                name = self.memo[stage, key] = self._choose(stage, key, run)
            if self.current.get(stage) != name:
                self._use(stage, name)
            return name

    def _use(self, stage: str, name: str):
        self.use_kernel(stage, name)
        self.current[stage] = name

    def _choose(self, stage: str, key: tuple, run: Callable[[], object]) -> str:
        names = self.kernel_names[stage]
        if self.forced is not None:
            return self.forced if self.forced in names else names[0]
        cache_key = json.dumps([stage, *self.describe(key)])
        name = self.choices.get(cache_key)
        if name not in names:
            name = self.choices[cache_key] = self._fastest(stage, run)
            self._save()
        return name

    def _fastest(self, stage: str, run: Callable[[], object]) -> str:
        baseline, *others = [n for n in self.kernel_names[stage] if n not in NOT_CANDIDATES]
        seconds = {}
        with torch.no_grad():
            for name in [baseline, *others]:
                self._use(stage, name)
                seconds[name] = self.timer(run)
        best = min(others, key=seconds.__getitem__, default=baseline)
        return best if seconds[best] < MARGIN * seconds[baseline] else baseline

    def _save(self):
        if self.cache_file:
            on_disk = _read_cache(self.cache_file) if os.path.exists(self.cache_file) else {}
            with atomic_open(self.cache_file, "w") as f:  # other processes may write it too
                json.dump({**on_disk, **self.choices}, f, indent=1, sort_keys=True)


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _describe(key: tuple) -> tuple:
    """A :func:`select_kernel` key as stored in the cache file: GPU name, dtypes, shape bucket."""
    device, value_dtype, locations_dtype, value_shape, locations_shape = key
    return (_device_name(device), str(value_dtype), str(locations_dtype)) + _bucket(value_shape, locations_shape)


@functools.cache
def _selector() -> Optional[KernelSelector]:
    """The process's selector, None when the built op has no kernel variants (no CUDA build).
    Reads ``$DINO_DETR_MSDA_KERNEL`` and ``$DINO_DETR_MSDA_KERNEL_CACHE`` (once: the first call)."""
    try:
        names = {stage: torch.ops.dino_detr.ms_deform_attn_kernel_names(stage) for stage in STAGES}
    except (AttributeError, RuntimeError):
        return None
    return KernelSelector(
        names,
        torch.ops.dino_detr.ms_deform_attn_use_kernel,
        cuda_timer,
        os.environ.get(ENV_CACHE) or None,
        os.environ.get(ENV_KERNEL, "auto"),
        _describe,
    )


def force_kernel(name: str) -> str:
    """Forces the CUDA kernel ``name`` from now on (as ``$DINO_DETR_MSDA_KERNEL``; ``"auto"``:
    select by timing) and returns the previous setting; no-op returning ``"auto"`` without a CUDA build."""
    selector = _selector()
    return "auto" if selector is None else selector.force(name)


def select_kernel(stage: str, value: torch.Tensor, sampling_locations: torch.Tensor, run: Callable[[], object]):
    """Before a CUDA call of ``stage`` on these inputs: makes the op run the chosen kernel (timing
    the candidates with ``run``, under no_grad, on the first call of its bucket). Does nothing
    while tracing, without a CUDA build, or when a choice would need timing while a CUDA graph is
    captured; the backward does not select under deterministic algorithms (the op runs its
    deterministic kernel). Call it under ``_selector().lock`` with the launch (:func:`run_selected`)."""
    if torch.compiler.is_compiling():
        return
    if stage == "backward" and torch.are_deterministic_algorithms_enabled():
        return
    selector = _selector()
    if selector is None:
        return
    key = (value.get_device(), value.dtype, sampling_locations.dtype, value.shape, sampling_locations.shape)
    if (stage, key) not in selector.memo and value.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    selector.select(stage, key, run)


def run_selected(stage: str, op: Callable, args: tuple, value: torch.Tensor, sampling_locations: torch.Tensor):
    """``op(*args)``, a CUDA call of ``stage`` on ``value`` and ``sampling_locations`` (among
    ``args``), with its chosen kernel: selection and launch hold the selector's lock."""
    selector = None if torch.compiler.is_compiling() else _selector()
    if selector is None:
        return op(*args)
    with selector.lock:
        select_kernel(stage, value, sampling_locations, lambda: op(*args))
        return op(*args)
