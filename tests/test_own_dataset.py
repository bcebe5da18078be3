"""The README's "Your own dataset" commands, run as written on a small COCO-format dataset this
test writes (3 classes, in the README's folder layout). Two substitutions keep it to seconds on a
CPU: the training command's configs/dino_r50_4scale.yaml becomes configs/dino_demo.yaml followed by
:data:`SMALL` (small images, a few iterations; the later commands read the run's config.yaml), and
weights/dino_r50_4scale_12ep.pth is a 4-class demo-sized checkpoint this test writes, so the
fine-tuning path (class heads re-initialised) is what runs."""

import json
import logging
import os
import re
import shlex

import cv2
import numpy as np
import pytest
import torch

from dino_detr import get_dino_cfg
from dino_detr.data import DemoSpec, ensure_demo_dataset
from dino_detr.engine import DinoTrainer

from train_utils import REPO

SPEC = DemoSpec(
    seed=5,
    splits={"train": 8, "val": 4},
    min_side=128,
    max_side=160,
    max_objects=3,
    empty_fraction=0.0,
    min_object_size=32.0,
    max_object_size=72.0,
)
SMALL = [
    "MODEL.DEVICE",
    "cpu",
    "INPUT.MIN_SIZE_TRAIN",
    "(128,)",
    "INPUT.MAX_SIZE_TRAIN",
    "200",
    "INPUT.MIN_SIZE_TEST",
    "128",
    "INPUT.MAX_SIZE_TEST",
    "200",
    "MODEL.DINO.NUM_QUERIES",
    "30",
    "MODEL.DINO.NUM_SELECT",
    "30",
    "MODEL.DINO.DN_NUMBER",
    "10",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.MAX_ITER",
    "3",
    "SOLVER.STEPS",
    "(2,)",
    "SOLVER.WARMUP_ITERS",
    "1",
    "TEST.EVAL_PERIOD",
    "0",
]
DEMO_CONFIG = str(REPO / "configs" / "dino_demo.yaml")


def readme_commands():
    """The commands of the first ``bash`` block of the README's "Your own dataset" section, as argv lists."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Your own dataset") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def _write_dataset(root):
    """The demo generator's images in the README layout, annotated with 3 of its 4 classes (stars are clutter)."""
    ensure_demo_dataset(root, SPEC)
    for split in SPEC.splits:
        path = root / "annotations" / f"{split}.json"
        data = json.loads(path.read_text())
        data["categories"] = [c for c in data["categories"] if c["name"] != "star"]
        kept = {c["id"] for c in data["categories"]}
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] in kept]
        path.write_text(json.dumps(data))


def _write_published_stand_in(path):
    """A 4-class checkpoint of the demo-sized model (the stand-in for converted COCO weights)."""
    cfg = get_dino_cfg(DEMO_CONFIG, SMALL)
    path.parent.mkdir(parents=True)
    torch.save({"model": DinoTrainer.build_model(cfg).state_dict()}, path)


def _write_clip(path, image_file):
    """4 frames: the image, flipped three ways."""
    image = cv2.resize(cv2.imread(str(image_file)), (160, 128))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (160, 128))
    for frame in (image, image[:, ::-1], image[::-1], image[::-1, ::-1]):
        writer.write(np.ascontiguousarray(frame))
    writer.release()


def test_readme_commands_train_evaluate_and_visualise(tmp_path, monkeypatch, caplog):
    commands = readme_commands()
    assert [c[:2] for c in commands] == [["python", "tools/train_net.py"]] * 2 + [["python", "tools/demo.py"]] * 2
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DINO_DETR_CACHE", str(tmp_path / "cache"))
    (tmp_path / "configs").symlink_to(REPO / "configs")
    _write_dataset(tmp_path / "datasets" / "mine")
    _write_published_stand_in(tmp_path / "weights" / "dino_r50_4scale_12ep.pth")
    _write_clip(tmp_path / "clip.mp4", tmp_path / "datasets" / "mine" / "val" / "000001.png")
    import demo
    import train_net

    logging.getLogger("dino_detr").addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="dino_detr")
    train, evaluate, visualise_images, visualise_video = (c[2:] for c in commands)
    assert train[train.index("--config-file") + 1] == "configs/dino_r50_4scale.yaml"
    train[train.index("--config-file") + 1] = DEMO_CONFIG
    train_net.main(train_net.argument_parser().parse_args(train + SMALL))
    assert os.path.isfile("output/mine/model_final.pth")
    reinitialised = re.findall(r"^  (\S+): checkpoint \((\d+), 128\)", caplog.text, re.M)
    assert sorted({name for name, _ in reinitialised}) == [  # (logged once; set: caplog may see it twice)
        "class_embed.0.weight",
        "class_embed.1.weight",
        "class_embed.2.weight",
        "label_enc.weight",
        "transformer.enc_out_class_embed.weight",
    ]
    assert "class_embed.0.bias: checkpoint (4,), model (3,)" in caplog.text
    assert "Dataset 'mine_train': 8 images" in caplog.text

    results = train_net.main(train_net.argument_parser().parse_args(evaluate))
    assert {"AP-circle", "AP-rectangle", "AP-triangle"} <= set(results["bbox"])

    written = demo.main(visualise_images)
    assert sorted(os.path.basename(p) for p in written) == [f"{i:06d}.png" for i in range(1, 5)]
    assert demo.main(visualise_video) == "output/mine/clip.mp4"
    assert cv2.VideoCapture("output/mine/clip.mp4").get(cv2.CAP_PROP_FRAME_COUNT) == 4


def test_num_classes_mismatch_stops_before_training(tmp_path, monkeypatch):
    """The dataset has 3 categories, the model 2: an error before the first iteration (was an IndexError)."""
    monkeypatch.setenv("DINO_DETR_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "mine"
    _write_dataset(root)
    import train_net

    args = train_net.argument_parser().parse_args(
        [
            "--config-file",
            DEMO_CONFIG,
            "--dataset",
            f"mismatch_train={root / 'annotations' / 'train.json'}:{root / 'train'}",
            "DATASETS.TRAIN",
            "('mismatch_train',)",
            "DATASETS.TEST",
            "()",
            "MODEL.DINO.NUM_CLASSES",
            "2",
            "OUTPUT_DIR",
            str(tmp_path / "out"),
            *SMALL,
        ]
    )
    with pytest.raises(
        ValueError,
        match=r"MODEL.DINO.NUM_CLASSES is 2 but the training dataset 'mismatch_train' has 3 "
        r"categories .*set MODEL.DINO.NUM_CLASSES 3",
    ):
        train_net.main(args)
    assert not os.path.exists(tmp_path / "out" / "model_final.pth")
