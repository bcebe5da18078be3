"""COCO-format datasets named in the config (``DATASETS.COCO``) or on the command line
(``--dataset NAME=JSON:FOLDER``), registered with Detectron2's COCO loader after a one-time
check of the annotation file and every image.

Policy (also in the README, "Your own dataset"):

* rejected before training, one ``DatasetError`` for all problems of a dataset (found in one
  pass; the message names the file, the image / annotation ids and, when there are many, a
  file listing all of them): a JSON file that does not parse; an entry that lacks a key; an
  annotation whose ``category_id`` is not in ``categories`` or whose ``image_id`` is not in
  ``images``; a bbox that is not four finite numbers; an image file that is missing,
  unreadable or truncated, or whose size (after its EXIF orientation, as Detectron2 reads it)
  differs from the JSON's ``width`` / ``height``.
* handled, with one logged count per dataset: boxes partly outside the image are clipped;
  boxes with no area left (zero width or height, or fully outside) are dropped; ``iscrowd``
  annotations are kept for evaluation and ignored in training; images without annotations
  are kept (training skips them with ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``); category ids
  that start at 0 or have gaps are mapped to contiguous ids by Detectron2 (the names come
  from ``categories``); grayscale, palette, RGBA and 16-bit images are converted to 8-bit RGB.

The check of a JSON file is cached (``$DINO_DETR_CACHE`` or ``~/.cache/dino_detr``) under
its absolute path, modification time and size, so a second run skips it.
"""

import hashlib
import json
import logging
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode

from ..fileio import atomic_open
from .image_io import open_image

__all__ = [
    "DatasetError",
    "check_coco_dataset",
    "load_checked_coco_json",
    "register_coco_dataset",
    "register_config_datasets",
    "parse_dataset_option",
    "check_num_classes",
]

logger = logging.getLogger(__name__)

# Bump when the check changes, so cached verdicts are recomputed.
CHECK_VERSION = 1
_MAX_LISTED = 10


class DatasetError(ValueError):
    """A dataset that cannot be trained on; the message lists the offending file and ids."""


def _cache_file(json_file: str, image_root: str) -> str:
    stat = os.stat(json_file)
    paths = f"{os.path.abspath(json_file)}|{os.path.abspath(image_root)}"
    key = f"{CHECK_VERSION}|{paths}|{stat.st_mtime_ns}|{stat.st_size}"
    folder = os.environ.get("DINO_DETR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dino_detr")
    return os.path.join(folder, "dataset_checks", hashlib.sha1(key.encode()).hexdigest() + ".json")


def _raise_if(problems: Dict[str, List[str]], json_file: str, report_file: str) -> None:
    """One ``DatasetError`` for all problems (per kind, e.g. "annotations" / "images"): their
    count, the first few of each kind, and ``report_file`` with all of them when some are left
    out of the message."""
    total = sum(len(p) for p in problems.values())
    if not total:
        return
    counts = ", ".join(f"{len(p)} in the {kind}" for kind, p in problems.items() if p)
    lines = []
    for found in problems.values():
        lines += found[:_MAX_LISTED]
        if len(found) > _MAX_LISTED:
            lines.append(f"... and {len(found) - _MAX_LISTED} more")
    more = ""
    if total > len(lines):
        os.makedirs(os.path.dirname(report_file), exist_ok=True)
        with open(report_file, "w") as f:
            f.write("".join(f"{p}\n" for found in problems.values() for p in found))
        more = f"\nAll {total} problems are listed in {report_file}"
    listed = "\n  ".join(lines)
    raise DatasetError(f"{json_file}: {total} problem(s) found before use ({counts}):\n  {listed}{more}")


def _well_formed(entries: Sequence, what: str, keys: Sequence[str]) -> Tuple[List[Dict], List[str]]:
    """The entries that are objects with all ``keys``, and one problem per other entry."""
    kept, problems = [], []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.append(f"{what}[{index}] is a {type(entry).__name__}, not an object")
            continue
        missing = [k for k in keys if k not in entry]
        if missing:
            ident = f"id {entry['id']}" if "id" in entry else f"index {index}"
            problems.append(f"{what} {ident} lacks the key(s) {missing}")
        else:
            kept.append(entry)
    return kept, problems


def _read_json(json_file: str) -> Dict:
    """The parsed file; ``DatasetError`` when it cannot be checked at all (missing, not JSON,
    not a COCO instances object)."""
    if not os.path.isfile(json_file):
        raise DatasetError(f"annotation file not found: {json_file}")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetError(f"{json_file}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{json_file}: the top level is a {type(data).__name__}, not an object")
    missing = [k for k in ("images", "annotations", "categories") if k not in data or not isinstance(data[k], list)]
    if missing:
        raise DatasetError(f"{json_file}: lacks the key(s) {missing} (lists, COCO instances format)")
    return data


def _duplicates(ids: Iterable) -> List:
    return [i for i, count in Counter(ids).items() if count > 1]


def _ids(entries: Sequence) -> set:
    return {e["id"] for e in entries if isinstance(e, dict) and "id" in e}


def _annotation_problems(data: Dict) -> Tuple[List[Dict], List[str]]:
    """The well-formed images, and every problem of the annotation file: malformed entries,
    duplicate ids, annotations naming an unknown category or image, boxes that are not numbers."""
    images, problems = _well_formed(data["images"], "image", ("id", "file_name", "width", "height"))
    annotations, more = _well_formed(data["annotations"], "annotation", ("id", "image_id", "category_id", "bbox"))
    problems += more + _well_formed(data["categories"], "category", ("id", "name"))[1]
    category_ids, image_ids = _ids(data["categories"]), _ids(data["images"])
    problems += [
        f"{what} id {i} appears more than once"
        for what, entries in (("image", data["images"]), ("annotation", data["annotations"]))
        for i in _duplicates(e["id"] for e in entries if isinstance(e, dict) and "id" in e)
    ]
    for ann in annotations:
        where = f"annotation id {ann['id']} (image id {ann['image_id']})"
        if ann["category_id"] not in category_ids:
            problems.append(
                f"{where}: category_id {ann['category_id']} is not in 'categories' (ids {sorted(category_ids)})"
            )
        if ann["image_id"] not in image_ids:
            problems.append(f"{where}: image_id is not in 'images'")
        box = ann["bbox"]
        if not (
            isinstance(box, list)
            and len(box) == 4
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
        ):
            problems.append(f"{where}: bbox {box} is not four finite numbers [x, y, width, height]")
    return images, problems


def _image_problem(image: Dict, image_root: str) -> Optional[str]:
    path = os.path.join(image_root, image["file_name"])
    where = f"image id {image['id']} ({path})"
    if not os.path.isfile(path):
        return f"{where}: file not found"
    try:
        width, height = open_image(path).size
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        return f"{where}: unreadable ({type(e).__name__}: {e})"
    if (width, height) != (image["width"], image["height"]):
        return (
            f"{where}: the JSON says {image['width']}x{image['height']} but the image is {width}x{height} "
            "(width x height, after its EXIF orientation); fix 'width'/'height' or the file"
        )
    return None


def check_coco_dataset(json_file: str, image_root: str, num_workers: Optional[int] = None) -> None:
    """Check a COCO instances file and every (well-formed) image it names in one pass; one
    ``DatasetError`` with all problems of the annotations and the images (file, image and
    annotation ids). A passing check is cached (see module doc).

    Args:
        num_workers: threads decoding the images (default: up to 8, one per CPU core).
    """
    cache = _cache_file(json_file, image_root) if os.path.isfile(json_file) else None
    if cache is not None and os.path.isfile(cache):
        return
    data = _read_json(json_file)
    images, annotation_problems = _annotation_problems(data)
    workers = num_workers or min(8, os.cpu_count() or 1)
    logger.info(f"Checking the {len(images)} images of {json_file} ({workers} threads, once) ...")
    with ThreadPoolExecutor(workers) as pool:
        image_problems = [p for p in pool.map(lambda im: _image_problem(im, image_root), images) if p]
    problems = {"annotations": annotation_problems, "images": image_problems}
    _raise_if(problems, json_file, cache[: -len(".json")] + ".problems.txt")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with atomic_open(cache, "w") as f:
        json.dump({"json_file": os.path.abspath(json_file), "images": len(data["images"])}, f)


def _clip_box(box: List[float], width: int, height: int) -> Tuple[List[float], bool]:
    """XYWH box clipped to the image, and whether it changed; width or height <= 0 means
    nothing is left."""
    x0, y0, w, h = box
    x1, y1 = min(max(x0 + w, 0.0), width), min(max(y0 + h, 0.0), height)
    x0, y0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
    clipped = [x0, y0, x1 - x0, y1 - y0]
    return clipped, clipped != list(box)


def _fix_boxes(records: List[Dict], name: str) -> None:
    """Clip boxes to their image and drop empty ones, in place; one log line with the counts."""
    clipped = dropped = crowd = 0
    for record in records:
        kept = []
        for obj in record["annotations"]:
            box, changed = _clip_box(obj["bbox"], record["width"], record["height"])
            if box[2] <= 0 or box[3] <= 0:
                dropped += 1
                continue
            clipped += changed
            crowd += obj.get("iscrowd", 0) == 1
            kept.append({**obj, "bbox": box, "bbox_mode": BoxMode.XYWH_ABS})
        record["annotations"] = kept
    empty = sum(1 for r in records if not r["annotations"])
    logger.info(
        f"Dataset '{name}': {len(records)} images ({empty} without annotations); {clipped} box(es) "
        f"clipped to their image, {dropped} box(es) with no area dropped, {crowd} iscrowd "
        "annotation(s) kept for evaluation only"
    )


def load_checked_coco_json(json_file: str, image_root: str, name: str) -> List[Dict]:
    """:func:`check_coco_dataset`, then Detectron2's ``load_coco_json`` (which sets the
    metadata ``thing_classes`` and ``thing_dataset_id_to_contiguous_id``), then boxes fixed
    as the module doc says."""
    check_coco_dataset(json_file, image_root)
    records = load_coco_json(json_file, image_root, name)
    _fix_boxes(records, name)
    return records


def register_coco_dataset(name: str, json_file: str, image_root: str) -> None:
    """Register ``name`` like Detectron2's ``register_coco_instances`` (evaluator type
    "coco"), loading through :func:`load_checked_coco_json`. Registering the same name with
    the same files again does nothing; with other files it is an error."""
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if (meta.get("json_file"), meta.get("image_root")) != (json_file, image_root):
            raise ValueError(
                f"dataset '{name}' is already registered (json_file={meta.get('json_file')}, "
                f"image_root={meta.get('image_root')}); choose another name"
            )
        return
    DatasetCatalog.register(name, lambda: load_checked_coco_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")


def register_config_datasets(cfg) -> None:
    """Register every ``[name, json_file, image_root]`` of ``cfg.DATASETS.COCO``."""
    for entry in cfg.DATASETS.COCO:
        if len(entry) != 3 or not all(isinstance(v, str) and v for v in entry):
            raise ValueError(f"DATASETS.COCO entries must be [name, annotation_json, image_folder], got {entry}")
        register_coco_dataset(*entry)


def parse_dataset_option(option: str) -> List[str]:
    """``"NAME=JSON:FOLDER"`` -> ``[NAME, JSON, FOLDER]`` (a ``DATASETS.COCO`` entry)."""
    name, sep, paths = option.partition("=")
    json_file, sep2, image_root = paths.rpartition(":")
    if not (sep and sep2 and name and json_file and image_root):
        raise ValueError(f"--dataset expects NAME=ANNOTATION_JSON:IMAGE_FOLDER, got {option!r}")
    return [name, json_file, image_root]


def check_num_classes(num_classes: int, dataset_names: Iterable[str]) -> None:
    """``ValueError`` naming ``MODEL.DINO.NUM_CLASSES`` when it differs from the number of
    categories of a (loaded) training dataset; datasets without ``thing_classes`` pass."""
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != num_classes:
            raise ValueError(
                f"MODEL.DINO.NUM_CLASSES is {num_classes} but the training dataset '{name}' has {len(classes)} "
                f"categories {list(classes)[:10]}{' ...' if len(classes) > 10 else ''}; set "
                f"MODEL.DINO.NUM_CLASSES {len(classes)} (MODEL.WEIGHTS of another class count are fine-tuned: "
                "their class heads are re-initialised)"
            )
