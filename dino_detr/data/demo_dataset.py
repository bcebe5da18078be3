"""The embedded demo dataset: a seeded generator of COCO-format JSON + PNG images, written
once into a cache folder, and its registration as Detectron2 datasets ``dino_demo_train``
and ``dino_demo_val``.

Layout of the folder::

    <root>/meta.json                 generator version and spec (written last)
    <root>/annotations/{split}.json  COCO instances
    <root>/{split}/NNNNNN.png        images

The folder is generated into a temporary sibling and renamed into place, so an
interrupted run never leaves a partial dataset behind.
"""

import dataclasses
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Dict, Optional

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .shapes import SHAPE_CLASSES, render_image

__all__ = ["DemoSpec", "DEFAULT_SPEC", "default_demo_root", "ensure_demo_dataset", "register_dino_demo"]

logger = logging.getLogger(__name__)

# Bump whenever the rendering changes, so cached folders are regenerated.
GENERATOR_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DemoSpec:
    """What to generate. Each image depends only on (seed, split, image index)."""

    seed: int = 0
    splits: Dict[str, int] = dataclasses.field(default_factory=lambda: {"train": 1000, "val": 100})
    min_side: int = 192
    max_side: int = 256
    max_objects: int = 4
    empty_fraction: float = 0.1
    min_object_size: float = 28.0
    max_object_size: float = 80.0

    def to_json(self) -> Dict:
        return {"version": GENERATOR_VERSION, **dataclasses.asdict(self)}


DEFAULT_SPEC = DemoSpec()


def default_demo_root() -> Path:
    """``$DINO_DEMO_ROOT`` if set, else ``datasets/dino_demo`` in the repository."""
    env = os.environ.get("DINO_DEMO_ROOT")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "datasets" / "dino_demo"


def _generate_split(spec: DemoSpec, split_index: int, split: str, count: int, folder: Path) -> Dict:
    """Render ``count`` images into ``folder/split`` and return the COCO dict."""
    (folder / split).mkdir(parents=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        rng = np.random.default_rng([spec.seed, split_index, image_id])
        height, width = rng.integers(spec.min_side, spec.max_side + 1, size=2)
        empty = rng.random() < spec.empty_fraction
        num_objects = 0 if empty else int(rng.integers(1, spec.max_objects + 1))
        image, objects = render_image(
            rng, int(height), int(width), num_objects, (spec.min_object_size, spec.max_object_size)
        )
        file_name = f"{image_id:06d}.png"
        if not cv2.imwrite(str(folder / split / file_name), image[:, :, ::-1]):
            raise OSError(f"could not write {folder / split / file_name}")
        images.append({"id": image_id, "file_name": file_name, "height": int(height), "width": int(width)})
        for obj in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj["category_id"] + 1,
                    "bbox": obj["bbox"],
                    "area": obj["area"],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(SHAPE_CLASSES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _is_complete(root: Path, spec: DemoSpec) -> bool:
    meta = root / "meta.json"
    try:
        return json.loads(meta.read_text()) == spec.to_json()
    except (OSError, ValueError):
        return False


def ensure_demo_dataset(root: Optional[os.PathLike] = None, spec: DemoSpec = DEFAULT_SPEC) -> Path:
    """Generate the dataset into ``root`` unless a complete one with the same spec is there.

    Safe against interruption (generation happens in a temporary sibling folder that is
    renamed into place) and against several processes generating at once (the first
    rename wins, the others discard their copy).

    Returns:
        the dataset folder.
    """
    root = Path(root) if root is not None else default_demo_root()
    if _is_complete(root, spec):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    logger.info(f"Generating the DINO demo dataset into {root} ({spec.splits}) ...")
    try:
        (tmp / "annotations").mkdir(parents=True)
        for split_index, (split, count) in enumerate(sorted(spec.splits.items())):
            coco = _generate_split(spec, split_index, split, count, tmp)
            (tmp / "annotations" / f"{split}.json").write_text(json.dumps(coco))
        (tmp / "meta.json").write_text(json.dumps(spec.to_json()))
        if root.exists() and not _is_complete(root, spec):
            stale = root.parent / f".{root.name}.stale-{uuid.uuid4().hex[:8]}"
            os.rename(root, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not _is_complete(root, spec):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def register_dino_demo(root: Optional[os.PathLike] = None, spec: DemoSpec = DEFAULT_SPEC, prefix: str = "dino_demo"):
    """Register ``{prefix}_{split}`` for every split of ``spec`` (COCO format, evaluator
    type "coco"). The data is generated lazily, the first time a split is loaded."""
    root = Path(root) if root is not None else default_demo_root()
    id_map = {i + 1: i for i in range(len(SHAPE_CLASSES))}
    for split in spec.splits:
        name = f"{prefix}_{split}"
        json_file = root / "annotations" / f"{split}.json"
        image_root = root / split

        def load(json_file=json_file, image_root=image_root, name=name):
            ensure_demo_dataset(root, spec)
            return load_coco_json(str(json_file), str(image_root), name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            json_file=str(json_file),
            image_root=str(image_root),
            evaluator_type="coco",
            thing_classes=list(SHAPE_CLASSES),
            thing_dataset_id_to_contiguous_id=id_map,
        )
