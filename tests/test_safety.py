"""Nothing executes, nothing is lost: safe weight loading (payload files through tools/demo.py and
tools/train_net.py --eval-only), the fit rule, crash-safe checkpoints and resume, the OUTPUT_DIR
lock, and the messages of config / CLI mistakes."""

import collections
import errno
import importlib.util
import logging
import os
import pickle
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
import torch
import torchvision
from detectron2.engine import DefaultPredictor
from torch import nn

import dino_detr.checkpoint.io as checkpoint_io
from dino_detr import get_dino_cfg
from dino_detr.checkpoint import (
    TRUSTED_WEIGHTS_ENV,
    SafeCheckpointer,
    UnreadableCheckpointError,
    UnsafeCheckpointError,
    is_class_dependent,
)
from dino_detr.engine import FiniteCheckpointer, OutputDirInUseError, build_dino_optimizer, lock_output_dir
from dino_detr.engine.nan_guard import check_finite_grad_norm

from child_process import child_env
from train_utils import REPO, TINY_MODEL

DEMO_CONFIG = str(REPO / "configs" / "dino_demo.yaml")
TINY = [*TINY_MODEL, "MODEL.DINO.DN_NUMBER", "4"]


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _eval_only(weights, output_dir):
    """``tools/train_net.py --eval-only`` of the tiny demo model with ``MODEL.WEIGHTS weights``."""
    train_net = _tool("train_net")
    argv = ["--config-file", DEMO_CONFIG, "--eval-only", *TINY, "MODEL.WEIGHTS", str(weights)]
    return train_net.main(train_net.argument_parser().parse_args([*argv, "OUTPUT_DIR", str(output_dir)]))


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.backbone(x))


class _Payload:
    """Unpickling it creates ``marker`` (a stand-in for any code a weight file could run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_payload(path, marker, arrays):
    """A weight file of ``arrays`` (NumPy in .pkl, tensors in .pth) that also holds a :class:`_Payload`."""
    pkl = str(path).endswith(".pkl")
    weights = {k: v if pkl else torch.from_numpy(v) for k, v in arrays.items()}
    content = {"model": weights, "__author__": "attacker", "note": _Payload(marker)}
    if pkl:
        with open(path, "wb") as f:
            pickle.dump(content, f)
    else:
        torch.save(content, path)


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_payload_in_weights_runs_no_code_through_the_tools(tmp_path, suffix, monkeypatch):
    marker = tmp_path / "code_ran"
    weights = tmp_path / f"evil{suffix}"
    _write_payload(weights, marker, {"backbone.weight": np.zeros((4, 3), np.float32)})
    image = tmp_path / "image.png"
    cv2.imwrite(str(image), np.full((64, 64, 3), 127, np.uint8))

    with pytest.raises(UnsafeCheckpointError, match=f"evil{suffix}.*{TRUSTED_WEIGHTS_ENV}="):
        _tool("demo").main(
            [
                "--config-file",
                DEMO_CONFIG,
                "--input",
                str(image),
                "--output",
                str(tmp_path / "vis"),
                *TINY,
                "MODEL.WEIGHTS",
                str(weights),
            ]
        )
    assert not marker.exists()

    with pytest.raises(UnsafeCheckpointError, match=f"evil{suffix}"):
        _eval_only(weights, tmp_path / "eval")
    assert not marker.exists()

    # The marker does detect execution: the documented opt-in loads the file with the full unpickler.
    model = _Toy()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    _write_payload(weights, marker, state)
    with pytest.raises(UnsafeCheckpointError):
        SafeCheckpointer(_Toy()).load(str(weights))
    monkeypatch.setenv(TRUSTED_WEIGHTS_ENV, str(weights))
    other = _Toy()
    SafeCheckpointer(other).load(str(weights))
    assert marker.exists() and torch.equal(other.head.weight, model.head.weight)


def test_model_zoo_pickles_load(tmp_path):
    """Detectron2 model-zoo .pkl files (dicts of NumPy arrays, any pickle protocol) load by name."""
    model = _Toy()
    arrays = collections.OrderedDict((k, v.numpy()) for k, v in model.state_dict().items())
    for protocol in (2, 4, 5):
        path = tmp_path / f"zoo{protocol}.pkl"
        with open(path, "wb") as f:
            pickle.dump(
                {"model": arrays, "__author__": "Detectron2 Model Zoo", "matching_heuristics": False},
                f,
                protocol=protocol,
            )
        other = _Toy()
        SafeCheckpointer(other).load(str(path))
        assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))


@pytest.fixture(scope="module")
def demo_cfg():
    return get_dino_cfg(DEMO_CONFIG, TINY)


def test_checkpoint_that_does_not_fit_is_refused(demo_cfg, tmp_path):
    """A torchvision ResNet-18 state dict given as MODEL.WEIGHTS stops DefaultPredictor and --eval-only (they
    used to load it with warnings and predict with random weights)."""
    cfg = demo_cfg.clone()
    cfg.MODEL.WEIGHTS = str(tmp_path / "resnet18.pth")
    torch.save(torchvision.models.resnet18().state_dict(), cfg.MODEL.WEIGHTS)
    message = r"resnet18.pth does not fit.*supplied 0 of the model's \d+ tensors.*backbone\.stem.*conv1.weight"
    with pytest.raises(ValueError, match=message):
        DefaultPredictor(cfg)
    with pytest.raises(ValueError, match=message):
        _eval_only(cfg.MODEL.WEIGHTS, tmp_path / "eval")


def test_fine_tune_and_backbone_checkpoints_fit(demo_cfg, tmp_path):
    """Class heads of another class count, or only a backbone (ImageNet initialisation), still load."""
    predictor = DefaultPredictor(demo_cfg)  # random weights
    state = predictor.model.state_dict()
    assert sum(map(is_class_dependent, state)) == 2 * 2 + 2 + 1  # 2 decoder heads, encoder head, label_enc
    other_classes = {k: torch.zeros(7, *v.shape[1:]) if is_class_dependent(k) else v for k, v in state.items()}
    torch.save({"model": other_classes}, tmp_path / "seven_classes.pth")
    torch.save({"model": {k: v for k, v in state.items() if k.startswith("backbone.")}}, tmp_path / "backbone.pth")
    model = predictor.model
    for name in ("seven_classes.pth", "backbone.pth"):
        SafeCheckpointer(model, reinit_class_tensors=True).load(str(tmp_path / name))
    # ... but a checkpoint with only the transformer's input projections does not.
    torch.save({"model": {k: v for k, v in state.items() if k.startswith("input_proj.")}}, tmp_path / "few.pth")
    with pytest.raises(ValueError, match="few.pth does not fit"):
        SafeCheckpointer(model).load(str(tmp_path / "few.pth"))


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpointer = SafeCheckpointer(_Toy(), str(tmp_path))
    checkpointer.save("model_0000001")

    def crash_mid_write(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(checkpoint_io.torch, "save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000002")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"


def test_a_full_disk_is_named_and_keeps_the_previous_checkpoint(tmp_path):
    # A real failed write: the child process may not grow a file beyond 256 KiB (RLIMIT_FSIZE; the write
    # fails with EFBIG as it would with ENOSPC), which torch.save alone reports as "unexpected pos ...".
    script = textwrap.dedent(
        f"""
        import resource, signal
        from torch import nn
        from dino_detr.checkpoint import SafeCheckpointer
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        checkpointer = SafeCheckpointer(nn.Linear(512, 512), {str(tmp_path)!r})
        checkpointer.save("model_0000001")
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**18, 2**18))
        try:
            checkpointer.save("model_0000002")
        except OSError as e:
            print("ERROR", e.errno, e)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=child_env())
    assert out.returncode == 0, out.stderr
    message = out.stdout.strip()
    assert message.startswith(f"ERROR {errno.EFBIG} "), message
    path = tmp_path / "model_0000002.pth"
    assert f"cannot write {path}: File too large (" in message and "GiB free on its disk" in message
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_resume_skips_an_unreadable_checkpoint(tmp_path):
    model = _Toy()
    checkpointer = SafeCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.head.weight.add_(1.0)
    checkpointer.save("model_0000003", iteration=3)
    os.utime(tmp_path / "model_0000001.pth", (1e9, 1e9))  # older
    newest = tmp_path / "model_0000003.pth"
    newest.write_bytes(newest.read_bytes()[:100])  # power loss: named in last_checkpoint, truncated

    resumed = _Toy()
    loader = SafeCheckpointer(resumed, str(tmp_path))
    records = _Records()
    loader.logger.addHandler(records)
    try:
        extra = loader.resume_or_load("", resume=True)
    finally:
        loader.logger.removeHandler(records)
    assert extra["iteration"] == 1
    assert all(torch.equal(resumed.state_dict()[k], good[k]) for k in good)
    assert any("model_0000003.pth" in m and "Cannot resume" in m for m in records.messages)

    (tmp_path / "model_0000001.pth").write_bytes(b"")
    with pytest.raises(UnreadableCheckpointError, match="no readable checkpoint"):
        SafeCheckpointer(_Toy(), str(tmp_path)).resume_or_load("", resume=True)


# Loads run_lock.py alone (not the whole package) so that the child starts fast.
_HOLD_LOCK = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("run_lock", sys.argv[1])
    run_lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_lock)
    run_lock.lock_output_dir(sys.argv[2])
    print("locked", flush=True)
    sys.stdin.read()
""")


def test_one_training_per_output_dir(tmp_path):
    output_dir = tmp_path / "run"
    lock = output_dir / "run.lock"
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(REPO / "dino_detr" / "engine" / "run_lock.py"), str(output_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        args = (
            _tool("train_net")
            .argument_parser()
            .parse_args(["--config-file", DEMO_CONFIG, *TINY, "OUTPUT_DIR", str(output_dir)])
        )
        with pytest.raises(OutputDirInUseError, match=f"in use by process {child.pid} on .*run.lock"):
            _tool("train_net").main(args)
        assert not (output_dir / "config.yaml").exists()
        held = lock.read_text()
    finally:
        child.communicate("")  # the child exits normally: its lock is released
    assert child.returncode == 0 and not lock.exists()
    lock.write_text(held)  # as if the child had been killed: a stale lock of a dead process
    lock_output_dir(str(output_dir))
    assert lock.read_text().split()[0] == str(os.getpid())


def test_nan_guard_names_a_checkpoint_that_exists(tmp_path):
    cfg = get_dino_cfg(DEMO_CONFIG, ["OUTPUT_DIR", str(tmp_path)])
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    model = _Toy()
    optimizer = build_dino_optimizer(cfg, model)
    model(torch.ones(1, 3)).sum().backward()
    model.head.bias.grad[0] = float("nan")
    with pytest.raises(FloatingPointError, match="no checkpoint has been written"):
        optimizer.step()
    SafeCheckpointer(model, str(tmp_path)).save("model_0000004")
    with pytest.raises(FloatingPointError, match=f"the last checkpoint, {tmp_path / 'model_0000004.pth'}, holds"):
        check_finite_grad_norm(torch.tensor(float("inf")), str(tmp_path))
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    with pytest.raises(FloatingPointError, match="Refusing to save checkpoint 'model_0000005'.*model_0000004.pth"):
        FiniteCheckpointer(model, str(tmp_path)).save("model_0000005")


def test_config_and_cli_mistakes_are_named(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.yaml is empty"):
        get_dino_cfg(empty)
    args = (
        _tool("train_net")
        .argument_parser()
        .parse_args(["--config-file", DEMO_CONFIG, "OUTPUT_DIR", str(tmp_path), "--resume"])
    )
    with pytest.raises(ValueError, match="'--resume' is among the KEY VALUE config overrides.*before them"):
        _tool("train_net").main(args)
    benchmark = _tool("benchmark")
    with pytest.raises(SystemExit) as error:
        benchmark.main(["--config-file", DEMO_CONFIG, "--repeats", "0"])
    assert error.value.code == 2
