"""A new user's mistakes end a tool with one message to act on (no traceback unless DINO_DETR_DEBUG=1),
and the demo skips an unreadable image, finishes the others and fails at the end."""

import json
import logging
import os
import subprocess
import sys

import benchmark
import convert_checkpoint
import export_model
import numpy as np
import pytest
import torch
from detectron2.utils.logger import setup_logger
from PIL import Image

import demo
import train_net
from train_utils import REPO, TINY_MODEL
from user_errors import DEBUG_ENV, run_tool

DEMO_CONFIG = str(REPO / "configs" / "dino_demo.yaml")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No debug flag, a fresh dataset-check cache, and the tools' log handlers (bound to this test's
    captured output by Detectron2's cached ``setup_logger``) removed afterwards."""
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    monkeypatch.setenv("DINO_DETR_CACHE", str(tmp_path / "cache"))
    loggers = [logging.getLogger(name) for name in ("dino_detr", "detectron2", "fvcore")]
    handlers = [list(logger.handlers) for logger in loggers]
    setup_logger.cache_clear()
    yield
    for logger, kept in zip(loggers, handlers):
        logger.handlers = kept
    setup_logger.cache_clear()


def _fails_with(capsys, message, function, *args):
    """``run_tool(function, *args)``: exit status 1, ``message`` on stderr, no traceback."""
    assert run_tool(function, *args) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and err.rstrip().endswith(f"(set {DEBUG_ENV}=1 to see the traceback)"), err


def _image(path, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)


def test_demo_skips_unreadable_images_and_finishes_the_rest(tmp_path, capsys, caplog):
    folder = tmp_path / "images"
    folder.mkdir()
    _image(folder / "a.png", 0)
    _image(folder / "b.jpg", 1)
    content = (folder / "b.jpg").read_bytes()
    (folder / "b.jpg").write_bytes(content[: len(content) // 2])  # truncated
    (folder / "c.png").write_text("not an image")
    _image(folder / "d.png", 2)
    out = tmp_path / "vis"
    logging.getLogger("dino_detr.demo").addHandler(caplog.handler)
    try:
        argv = ["--config-file", DEMO_CONFIG, "--input", str(folder), "--output", str(out), *TINY_MODEL]
        _fails_with(capsys, "2 of 4 input images could not be read (named above)", demo.main, argv)
    finally:
        logging.getLogger("dino_detr.demo").removeHandler(caplog.handler)
    assert sorted(os.listdir(out)) == ["a.png", "d.png"]  # the images after the broken ones too
    skipped = sorted({r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")})
    assert len(skipped) == 2, skipped
    assert skipped[0].startswith(f"skipped {folder / 'b.jpg'}: unreadable image (OSError: image file is truncated")
    assert skipped[1].startswith(f"skipped {folder / 'c.png'}: unreadable image (UnidentifiedImageError: ")


def test_config_and_weight_mistakes_end_the_demo_with_a_message(tmp_path, capsys, monkeypatch):
    _image(tmp_path / "a.png", 0)
    argv = ["--config-file", DEMO_CONFIG, "--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "vis")]
    argv += TINY_MODEL
    _fails_with(capsys, "error: Non-existent key: MODEL.DINO.NOPE\n", demo.main, argv + ["MODEL.DINO.NOPE", "1"])
    _fails_with(
        capsys, "MODEL.DINO.NUM_QUERIES must be positive, got -3", demo.main, argv + ["MODEL.DINO.NUM_QUERIES", -3]
    )
    missing = tmp_path / "missing.pth"
    _fails_with(capsys, f"Checkpoint {missing} not found", demo.main, argv + ["MODEL.WEIGHTS", str(missing)])
    truncated = tmp_path / "truncated.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    _fails_with(
        capsys,
        f"UnreadableCheckpointError: {truncated}: not a readable PyTorch file",
        demo.main,
        argv + ["MODEL.WEIGHTS", str(truncated)],
    )
    monkeypatch.setenv(DEBUG_ENV, "1")  # the traceback, as a plain Python error
    with pytest.raises(AssertionError, match="Non-existent key: MODEL.DINO.NOPE"):
        run_tool(demo.main, argv + ["MODEL.DINO.NOPE", "1"])


def test_a_broken_dataset_ends_training_with_all_its_problems(tmp_path, capsys):
    _image(tmp_path / "a.png", 0)
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
            {"id": 2, "file_name": "gone.png", "width": 64, "height": 48},
        ],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 20, 20]}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "mine.json").write_text(json.dumps(data))
    args = train_net.argument_parser().parse_args(
        ["--config-file", DEMO_CONFIG, "--dataset", f"mine_broken={tmp_path / 'mine.json'}:{tmp_path}", *TINY_MODEL]
        + ["DATASETS.TRAIN", "('mine_broken',)", "MODEL.DINO.NUM_CLASSES", "1", "OUTPUT_DIR", str(tmp_path / "out")]
    )
    _fails_with(capsys, "2 problem(s) found before use (1 in the annotations, 1 in the images)", train_net.main, args)


def test_other_tools_end_with_a_message(tmp_path, capsys):
    bad_key = ["MODEL.DINO.NOPE", "1"]
    message = "error: Non-existent key: MODEL.DINO.NOPE\n"
    _fails_with(capsys, message, benchmark.main, ["--config-file", DEMO_CONFIG, *bad_key])
    output = str(tmp_path / "m.pt2")
    argv = ["--config-file", DEMO_CONFIG, "--format", "torch-export", "--output", output, *bad_key]
    _fails_with(capsys, message, export_model.main, argv)
    missing = tmp_path / "official.pth"
    argv = ["--source", "official", str(missing), str(tmp_path / "out.pth")]
    _fails_with(capsys, f"checkpoint file not found: {missing}", convert_checkpoint.main, argv)


def test_a_tool_script_exits_1_with_the_message(tmp_path):
    missing = tmp_path / "official.pth"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "--source", "official", str(missing), "x.pth"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO), DINO_DETR_DEBUG=""),
    )
    assert result.returncode == 1
    assert f"convert_checkpoint.py: error: checkpoint file not found: {missing}\n" in result.stderr
    assert "Traceback" not in result.stderr
