"""COCO-format datasets from the config: what real annotation files contain is either handled
(with a logged count) or rejected before training with the file and the ids named."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from dino_detr import get_dino_cfg
from dino_detr.data import (
    DatasetError,
    DinoDatasetMapper,
    check_coco_dataset,
    check_num_classes,
    parse_dataset_option,
    register_coco_dataset,
    register_config_datasets,
)
from dino_detr.data import coco as coco_module

from train_utils import REPO

CATEGORIES = [{"id": 0, "name": "zero"}, {"id": 5, "name": "five"}, {"id": 9, "name": "nine"}]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DINO_DETR_CACHE", str(tmp_path / "cache"))


def _texture(height, width, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, channels), dtype=np.uint8)


def _exif_rotated_jpeg(path, stored_width, stored_height):
    """A JPEG stored as stored_width x stored_height with EXIF orientation 6 (displayed rotated by 90 degrees)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_texture(stored_height, stored_width)).save(path, exif=exif.tobytes())


def _write_images(root):
    """Every image kind of the good dataset: name -> (width, height) as Detectron2 reads it."""
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_texture(40, 60)).save(root / "photo.jpg", quality=90)
    Image.fromarray(_texture(50, 70)).save(root / "photo.png")
    Image.fromarray(_texture(48, 64)[:, :, 0]).save(root / "gray.png")
    Image.fromarray(_texture(44, 66, 4), mode="RGBA").save(root / "rgba.png")
    wide = (np.arange(36 * 52, dtype=np.uint32).reshape(36, 52) * 30).astype(np.uint16)  # up to 56130
    Image.fromarray(wide).save(root / "deep16.png")
    _exif_rotated_jpeg(root / "rotated.jpg", stored_width=80, stored_height=30)
    return {
        "photo.jpg": (60, 40),
        "photo.png": (70, 50),
        "gray.png": (64, 48),
        "rgba.png": (66, 44),
        "deep16.png": (52, 36),
        "rotated.jpg": (30, 80),
    }


def _good_coco(root):
    sizes = _write_images(root)
    images = [
        {"id": i + 10, "file_name": name, "width": w, "height": h} for i, (name, (w, h)) in enumerate(sizes.items())
    ]
    anns = [
        {"id": 1, "image_id": 10, "category_id": 0, "bbox": [5, 5, 20, 15], "area": 300, "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 9, "bbox": [50, 30, 30, 30], "area": 900, "iscrowd": 0},  # clipped
        {"id": 3, "image_id": 11, "category_id": 5, "bbox": [10, 10, 0, 12], "area": 0, "iscrowd": 0},  # zero width
        {"id": 4, "image_id": 11, "category_id": 5, "bbox": [20, 10, 30, 20], "area": 600, "iscrowd": 1},
        {"id": 5, "image_id": 12, "category_id": 9, "bbox": [1, 1, 30, 30], "area": 900, "iscrowd": 0},
        {"id": 6, "image_id": 14, "category_id": 0, "bbox": [-10, 4, 20, 20], "area": 400, "iscrowd": 0},  # clipped
        {"id": 7, "image_id": 15, "category_id": 5, "bbox": [2, 40, 20, 30], "area": 600, "iscrowd": 0},
    ]  # image 13 (rgba.png) has no annotations
    return {"images": images, "annotations": anns, "categories": CATEGORIES}


def _write_json(path, data):
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


@pytest.fixture
def good(tmp_path):
    root = tmp_path / "images"
    data = _good_coco(root)
    return _write_json(tmp_path / "good.json", data), str(root), data


def test_real_world_dataset_is_handled_with_logged_counts(good, caplog):
    json_file, root, _ = good
    register_coco_dataset("own_good", json_file, root)
    register_coco_dataset("own_good", json_file, root)  # same files again: nothing to do
    with caplog.at_level(logging.INFO, logger="dino_detr"):
        records = DatasetCatalog.get("own_good")
    assert (
        "6 images (1 without annotations); 2 box(es) clipped to their image, 1 box(es) with no area dropped, "
        "1 iscrowd annotation(s) kept for evaluation only" in caplog.text
    )
    meta = MetadataCatalog.get("own_good")
    assert meta.thing_classes == ["zero", "five", "nine"]
    assert meta.thing_dataset_id_to_contiguous_id == {0: 0, 5: 1, 9: 2}
    assert meta.evaluator_type == "coco"
    by_name = {os.path.basename(r["file_name"]): r for r in records}
    assert [a["category_id"] for a in by_name["photo.jpg"]["annotations"]] == [0, 2]
    assert by_name["photo.jpg"]["annotations"][1]["bbox"] == [50, 30, 10, 10]
    assert by_name["deep16.png"]["annotations"][0]["bbox"] == [0, 4, 10, 20]
    assert [a["iscrowd"] for a in by_name["photo.png"]["annotations"]] == [1]
    check_num_classes(3, ["own_good"])
    with pytest.raises(
        ValueError,
        match=r"MODEL.DINO.NUM_CLASSES is 80 but the training dataset 'own_good' has 3 "
        r"categories .*set MODEL.DINO.NUM_CLASSES 3",
    ):
        check_num_classes(80, ["own_good"])

    cfg = get_dino_cfg(REPO / "configs" / "dino_demo.yaml")
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 1000
    mapper = DinoDatasetMapper(cfg, is_train=True)
    for record in records:  # every image kind maps to 3 channels; crowd boxes are not trained on
        out = mapper(record)
        assert out["image"].shape[0] == 3 and out["image"].dtype.is_floating_point is False
        assert len(out["instances"]) == sum(1 for a in record["annotations"] if not a["iscrowd"])
    rotated = mapper(by_name["rotated.jpg"])["image"]
    assert rotated.shape[1:] == (int(round(80 * 64 / 30)), 64)  # portrait after EXIF: height > width
    deep = DinoDatasetMapper(cfg, is_train=False).read_image(by_name["deep16.png"])
    expected = np.rint(np.asarray(Image.open(by_name["deep16.png"]["file_name"]), np.float64) / 257)
    assert np.abs(deep[:, :, 0] - expected).max() <= 1  # scaled, not saturated
    assert (deep == 255).mean() < 0.01


def test_check_is_cached_by_json_path_mtime_and_size(good, monkeypatch):
    json_file, root, data = good
    opened = []
    real_open = coco_module.open_image
    monkeypatch.setattr(coco_module, "open_image", lambda path: opened.append(path) or real_open(path))
    check_coco_dataset(json_file, root)
    assert len(opened) == len(data["images"])
    check_coco_dataset(json_file, root)
    assert len(opened) == len(data["images"])  # second run: cached
    os.remove(os.path.join(root, "photo.png"))
    _write_json(Path(json_file), json.dumps(data) + " ")  # another size: checked again, the loss is found
    with pytest.raises(DatasetError, match=r"image id 11 \(.*photo.png\): file not found"):
        check_coco_dataset(json_file, root)


def _reject(tmp_path, data, pattern, root=None):
    json_file = _write_json(tmp_path / "bad.json", data)
    with pytest.raises(DatasetError, match=pattern) as error:
        check_coco_dataset(json_file, str(root or tmp_path / "images"))
    assert "bad.json" in str(error.value)
    return str(error.value)


def test_broken_annotation_files_are_rejected_with_file_and_ids(good, tmp_path):
    _, _, data = good
    _reject(tmp_path, '{"images": [', "not valid JSON")
    _reject(tmp_path, {"images": [], "categories": []}, r"lacks the key\(s\) \['annotations'\]")
    no_bbox = json.loads(json.dumps(data))
    del no_bbox["annotations"][3]["bbox"]
    _reject(tmp_path, no_bbox, r"annotation id 4 lacks the key\(s\) \['bbox'\]")
    bad = json.loads(json.dumps(data))
    bad["annotations"][1]["category_id"] = 7
    bad["annotations"][4]["image_id"] = 99
    bad["annotations"][5]["bbox"] = [1, 2, 3]
    message = _reject(tmp_path, bad, "3 problem")
    assert "annotation id 2 (image id 10): category_id 7 is not in 'categories' (ids [0, 5, 9])" in message
    assert "annotation id 5 (image id 99): image_id is not in 'images'" in message
    assert "annotation id 6 (image id 14): bbox [1, 2, 3] is not four finite numbers" in message


def test_broken_images_are_rejected_before_training(good, tmp_path):
    _, root, data = good
    data = json.loads(json.dumps(data))
    content = (tmp_path / "images" / "photo.jpg").read_bytes()
    (tmp_path / "images" / "truncated.jpg").write_bytes(content[: len(content) // 2])
    (tmp_path / "images" / "text.png").write_text("not an image")
    _exif_rotated_jpeg(tmp_path / "images" / "stored_size.jpg", stored_width=80, stored_height=30)
    data["images"] += [
        {"id": 20, "file_name": "truncated.jpg", "width": 60, "height": 40},
        {"id": 21, "file_name": "text.png", "width": 10, "height": 10},
        {"id": 22, "file_name": "stored_size.jpg", "width": 80, "height": 30},
        {"id": 23, "file_name": "missing.png", "width": 10, "height": 10},
    ]
    message = _reject(tmp_path, data, "4 problem")
    assert "image id 20 (" in message and "truncated.jpg): unreadable" in message
    assert "image id 21 (" in message and "text.png): unreadable" in message
    assert "image id 22 (" in message and "stored_size.jpg): the JSON says 80x30 but the image is 30x80" in message
    assert "image id 23 (" in message and "missing.png): file not found" in message


def test_datasets_from_config_and_command_line(good, tmp_path):
    json_file, root, _ = good
    assert parse_dataset_option(f"own_cli={json_file}:{root}") == ["own_cli", json_file, root]
    with pytest.raises(ValueError, match="NAME=ANNOTATION_JSON:IMAGE_FOLDER"):
        parse_dataset_option(json_file)
    override = ["DATASETS.COCO", f"[['own_cli', '{json_file}', '{root}']]"]
    cfg = get_dino_cfg(REPO / "configs" / "dino_demo.yaml", override)
    register_config_datasets(cfg)
    assert MetadataCatalog.get("own_cli").json_file == json_file
    cfg.DATASETS.COCO = [["own_cli", str(tmp_path / "other.json"), root]]
    with pytest.raises(ValueError, match="'own_cli' is already registered"):
        register_config_datasets(cfg)


def test_every_problem_of_a_dataset_is_reported_in_one_pass(good, tmp_path):
    """Annotation and image problems together (not the images only on the next run); beyond ten of
    a kind, the message points to a file listing all of them."""
    _, _, data = good
    data = json.loads(json.dumps(data))
    del data["annotations"][0]["bbox"]
    data["annotations"][1]["category_id"] = 7
    data["images"].append({"id": 30, "file_name": "missing.png", "height": 10})  # no width: not opened
    data["images"] += [{"id": 40 + i, "file_name": f"gone{i}.png", "width": 9, "height": 9} for i in range(12)]
    message = _reject(tmp_path, data, r"15 problem\(s\) found before use \(3 in the annotations, 12 in the images\)")
    assert "annotation id 1 lacks the key(s) ['bbox']" in message
    assert "annotation id 2 (image id 10): category_id 7" in message
    assert "image id 30 lacks the key(s) ['width']" in message
    assert "gone9.png): file not found" in message and "gone10.png" not in message
    assert "... and 2 more" in message
    report = message.rsplit("All 15 problems are listed in ", 1)[1]
    listed = Path(report).read_text().splitlines()
    assert len(listed) == 15 and "gone11.png): file not found" in listed[-1]
