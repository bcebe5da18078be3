"""Choice of the MSDA CUDA kernel by measurement (dino_detr/layers/ms_deform_attn_kernels.py), with
a fake timer: the fastest candidate wins only when clearly faster than the baseline, the choice is
remembered per (stage, key) and in the cache file, DINO_DETR_MSDA_KERNEL forces one (an unknown
name is a clear error), the deterministic kernel is never a timed candidate, the op's kernel is set
only when it changes, threads neither time at once nor launch with another thread's choice, and a
corrupt cache file is a clear error. The CPU kernels' determinism: bitwise identical results for
any thread count."""

import json
import threading
import time

import pytest
import torch

from dino_detr.layers import ms_deform_attn
from dino_detr.layers import ms_deform_attn_kernels as kernels
from dino_detr.layers.ms_deform_attn_kernels import ENV_CACHE, ENV_KERNEL, KernelSelector, run_selected, shape_bucket

from msda_inputs import make_inputs

NAMES = {"forward": ["baseline", "vectorized"], "backward": ["baseline", "vectorized", "deterministic"]}


class FakeOp:
    """The op's kernel switch and a timer that reports each kernel's preset time."""

    def __init__(self, seconds):
        self.seconds = seconds  # (stage, name) -> seconds
        self.current = {}
        self.timed = []
        self.switches = 0

    def use_kernel(self, stage, name):
        self.current[stage] = name
        self.switches += 1

    def timer(self, run):
        run()
        stage, name = run.stage, self.current[run.stage]
        assert not torch.is_grad_enabled()  # the candidates run under no_grad
        self.timed.append((stage, name))
        return self.seconds[stage, name]


def _run(stage):
    def run():
        pass

    run.stage = stage
    return run


def _selector(seconds, cache_file=None, forced="auto"):
    op = FakeOp(seconds)
    return op, KernelSelector(NAMES, op.use_kernel, op.timer, cache_file, forced)


@pytest.fixture(autouse=True)
def auto(monkeypatch):
    monkeypatch.delenv(ENV_KERNEL, raising=False)


def test_fastest_candidate_is_chosen_once_and_remembered():
    op, selector = _selector({("backward", "baseline"): 2.0, ("backward", "vectorized"): 1.0})
    assert selector.select("backward", ("gpu", 1), _run("backward")) == "vectorized"
    assert op.current["backward"] == "vectorized"
    assert op.timed == [("backward", "baseline"), ("backward", "vectorized")]  # never "deterministic"
    switches = op.switches
    assert selector.select("backward", ("gpu", 1), _run("backward")) == "vectorized"
    assert len(op.timed) == 2 and op.switches == switches  # remembered, not timed again, nor set again
    selector.select("backward", ("gpu", 2), _run("backward"))  # another bucket is measured
    assert len(op.timed) == 4


@pytest.mark.parametrize("variant_seconds,chosen", [(0.99, "baseline"), (1.0, "baseline"), (1.5, "baseline")])
def test_baseline_stays_unless_clearly_faster(variant_seconds, chosen):
    """Within the 3% margin (timing noise) or slower, the baseline keeps its place: no variant
    makes a call slower than today's kernel."""
    op, selector = _selector({("forward", "baseline"): 1.0, ("forward", "vectorized"): variant_seconds})
    assert selector.select("forward", ("k",), _run("forward")) == chosen


def test_cache_file_keeps_choices_across_processes(tmp_path):
    cache = tmp_path / "msda_kernels.json"
    seconds = {("forward", "baseline"): 3.0, ("forward", "vectorized"): 1.0}
    op, selector = _selector(seconds, str(cache))
    selector.select("forward", ("H100", "torch.float32", 1024), _run("forward"))
    assert json.loads(cache.read_text()) == {json.dumps(["forward", "H100", "torch.float32", 1024]): "vectorized"}
    op2, selector2 = _selector(seconds, str(cache))  # a new process
    assert selector2.select("forward", ("H100", "torch.float32", 1024), _run("forward")) == "vectorized"
    assert op2.timed == [] and op2.current["forward"] == "vectorized"


def test_forced_kernel_and_its_errors():
    op, selector = _selector({}, forced="deterministic")
    assert selector.select("backward", ("k",), _run("backward")) == "deterministic"
    assert selector.select("forward", ("k",), _run("forward")) == "baseline"  # the forward has none of that name
    assert selector.force("vectorized") == "deterministic"
    assert selector.select("forward", ("k",), _run("forward")) == "vectorized"  # the memo follows the new setting
    message = r"DINO_DETR_MSDA_KERNEL='vectorised'.*auto or.*baseline, deterministic, vectorized"
    with pytest.raises(ValueError, match=message):
        selector.force("vectorised")
    with pytest.raises(ValueError, match=message):
        _selector({}, forced="vectorised")
    assert op.timed == []


def test_environment_is_read_once(monkeypatch):
    """The process's selector reads DINO_DETR_MSDA_KERNEL when it is made (the first CUDA call),
    not per call; force_kernel changes the setting later."""
    monkeypatch.setattr(torch.ops.dino_detr, "ms_deform_attn_kernel_names", lambda stage: NAMES[stage], raising=False)
    monkeypatch.setattr(torch.ops.dino_detr, "ms_deform_attn_use_kernel", lambda stage, name: None, raising=False)
    monkeypatch.setenv(ENV_KERNEL, "vectorized")
    kernels._selector.cache_clear()
    try:
        selector = kernels._selector()
        monkeypatch.setenv(ENV_KERNEL, "baseline")
        assert selector.select("forward", ("k",), _run("forward")) == "vectorized"
        assert kernels.force_kernel("baseline") == "vectorized"
        assert selector.select("forward", ("k",), _run("forward")) == "baseline"
    finally:
        kernels._selector.cache_clear()


def test_shape_bucket():
    value = torch.empty(2, 1000, 8, 32)
    loc = torch.empty(2, 300, 8, 4, 4, 2)
    assert shape_bucket(value, loc) == (1024, 1024, 8, 32, 4, 4)
    assert shape_bucket(torch.empty(2, 1024, 8, 32), torch.empty(2, 257, 8, 4, 4, 2))[:2] == (1024, 1024)


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_kernels_are_deterministic(threads):
    """The CPU kernels own their outputs per thread (forward: (n, q) rows; backward: (n, m) heads,
    each summed in one fixed order), so their results are bitwise the same run to run and for any
    thread count: no deterministic mode is needed there."""
    inputs = make_inputs(2, [[6, 5], [2, 2], [1, 1]], 4, 8, 60, 4, dtype=torch.float32, seed=2)
    inputs = tuple(t.requires_grad_() if t.is_floating_point() else t for t in inputs)
    grad_out = torch.randn(2, 60, 32, generator=torch.Generator().manual_seed(0))
    previous = torch.get_num_threads()

    def run(n):
        torch.set_num_threads(n)
        out = ms_deform_attn(*inputs)
        return (out,) + torch.autograd.grad(out, (inputs[0], inputs[3], inputs[4]), grad_out)

    try:
        reference, again = run(threads), run(threads)
        other = run(3 - threads)
    finally:
        torch.set_num_threads(previous)
    for a, b, c in zip(reference, again, other):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_select_kernel_keys_and_skips(monkeypatch):
    """select_kernel keys a choice by device, dtypes and exact shapes (stored in the cache file by
    GPU name, dtypes and shape bucket), and leaves the choice alone for the backward under
    deterministic algorithms (the op runs its deterministic kernel)."""
    calls = []

    class Recorder:
        memo = {}

        def select(self, stage, key, run):
            calls.append((stage, key))

    monkeypatch.setattr(kernels, "_selector", lambda: Recorder())
    monkeypatch.setattr(kernels, "_device_name", lambda index: "Fake GPU")
    value, loc = torch.empty(2, 1000, 8, 32, dtype=torch.float16), torch.empty(2, 300, 8, 4, 4, 2)
    kernels.select_kernel("forward", value, loc, lambda: None)
    key = (-1, torch.float16, torch.float32, value.shape, loc.shape)
    assert calls == [("forward", key)]
    assert kernels._describe(key) == ("Fake GPU", "torch.float16", "torch.float32", 1024, 1024, 8, 32, 4, 4)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        kernels.select_kernel("backward", value, loc, lambda: None)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert len(calls) == 1


def test_corrupt_cache_file_is_a_clear_error(tmp_path):
    cache = tmp_path / "msda_kernels.json"
    for content in ('{"forward": ', "[1, 2]", '{"k": 3}'):
        cache.write_text(content)
        with pytest.raises(ValueError, match=f"{ENV_CACHE}=.*msda_kernels.json.* is not an ms_deform_attn kernel"):
            _selector({}, str(cache))


def _in_threads(fn, count):
    """Runs fn(0), ..., fn(count - 1) in parallel threads; re-raises the first error."""
    errors = []

    def target(i):
        try:
            fn(i)
        except Exception as e:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_threads_time_one_at_a_time_and_share_the_cache_file(tmp_path):
    """Two threads never time at once (that would make both measurements noisy), and choices
    selected from several threads all reach the cache file (each write has its own temporary file)."""
    cache = tmp_path / "msda_kernels.json"
    active, overlaps = [0], []

    class SlowOp(FakeOp):
        def timer(self, run):
            active[0] += 1
            overlaps.append(active[0])
            time.sleep(0.002)
            active[0] -= 1
            return super().timer(run)

    op = SlowOp({("forward", "baseline"): 2.0, ("forward", "vectorized"): 1.0})
    selector = KernelSelector(NAMES, op.use_kernel, op.timer, str(cache))
    _in_threads(lambda i: selector.select("forward", (i,), _run("forward")), 8)
    assert max(overlaps) == 1 and len(op.timed) == 16
    assert json.loads(cache.read_text()) == {json.dumps(["forward", i]): "vectorized" for i in range(8)}
    assert not [p for p in tmp_path.iterdir() if p.name != cache.name]  # no temporary file left


def test_threads_launch_with_their_own_choice(monkeypatch):
    """The op's kernel choice is process-global: run_selected holds the lock from selection to
    launch, so a launch never runs the kernel another thread chose in between."""
    op = FakeOp({})
    selector = KernelSelector(NAMES, op.use_kernel, op.timer, describe=lambda key: (str(key),))
    monkeypatch.setattr(kernels, "_selector", lambda: selector)
    chosen = {(128,): "baseline", (256,): "vectorized"}
    for (n,), name in chosen.items():
        selector.memo["forward", (-1, torch.float32, torch.float32, (1, n, 1, 1), (1, 1))] = name
    ran = []

    def launch(n):
        time.sleep(0.001)  # the window in which another thread could change the choice
        ran.append((n, op.current["forward"]))

    def call(i):
        n = 128 if i % 2 else 256
        value = torch.empty(1, n, 1, 1)
        for _ in range(10):
            run_selected("forward", launch, (n,), value, torch.empty(1, 1))

    _in_threads(call, 4)
    assert len(ran) == 40 and all(name == chosen[n,] for n, name in ran)
