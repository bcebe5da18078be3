"""Inference helpers shared by ``tools/demo.py`` and ``tools/run_demo.py``: ``DinoPredictor``
(Detectron2's ``DefaultPredictor`` that accepts more image formats), finding image files and
saving Detectron2 ``Visualizer`` drawings."""
import os
from pathlib import Path
from typing import Iterable, List

import cv2
import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import Visualizer

__all__ = ["DinoPredictor", "MIN_RESIZED_SIDE", "list_images", "to_bgr_uint8", "visualize_predictions"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Both sides of the resized network input must have at least one stride-32 feature cell.
MIN_RESIZED_SIDE = 32


def to_bgr_uint8(image: np.ndarray) -> np.ndarray:
    """The (H, W, 3) uint8 BGR image ``DefaultPredictor`` expects, from any of:

    * layout: (H, W) or (H, W, 1) grayscale (replicated to 3 channels), (H, W, 3) BGR,
      (H, W, 4) BGRA (alpha dropped);
    * dtype: uint8 as is; uint16 divided by 257 (65535 -> 255); float with all values in
      [0, 1] multiplied by 255, float in [0, 255] as is (rounded).

    Raises ``TypeError`` / ``ValueError`` saying what was given and what is needed for anything
    else: another layout or dtype, an empty image, NaN / Inf or out-of-range float values.
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected an image as a numpy array (H, W, 3) BGR, got {type(image).__name__}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"image of shape {image.shape}: expected (H, W) or (H, W, 1) grayscale, (H, W, 3) BGR "
                         "or (H, W, 4) BGRA")
    if image.size == 0:
        raise ValueError(f"empty image of shape {image.shape}: expected at least one pixel")
    image = image[:, :, :3] if image.shape[2] == 4 else image
    if image.dtype == np.uint16:
        image = image.astype(np.float32) / 257.0
    elif np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ValueError(f"image has {int((~np.isfinite(image)).sum())} NaN/Inf values; expected finite pixels")
        low, high = float(image.min()), float(image.max())
        if low < 0 or high > 255:
            raise ValueError(f"float image with values in [{low:g}, {high:g}]: expected [0, 1] or [0, 255]")
        image = image * 255.0 if high <= 1 else image
    elif image.dtype != np.uint8:
        raise ValueError(f"image of dtype {image.dtype}: expected uint8, uint16 or float")
    image = np.rint(image).astype(np.uint8) if image.dtype != np.uint8 else image
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


class DinoPredictor(DefaultPredictor):
    """Detectron2's ``DefaultPredictor`` (same config, weights and output) whose input may be
    any image :func:`to_bgr_uint8` converts; an image that the test-time resize
    (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``) would shrink below ``MIN_RESIZED_SIDE``
    pixels on a side is refused with its size."""

    def __call__(self, original_image: np.ndarray):
        image = to_bgr_uint8(original_image)
        h, w = image.shape[:2]
        short, longest = self.aug.short_edge_length[0], self.aug.max_size
        size = self.aug.get_output_shape(h, w, short, longest) if short else (h, w)
        if min(size) < MIN_RESIZED_SIDE:
            raise ValueError(
                f"image of {h}x{w} pixels is too small or too elongated: resized for the model (INPUT.MIN_SIZE_TEST "
                f"{short}, MAX_SIZE_TEST {longest}) it becomes {size[0]}x{size[1]}; both sides must be at least "
                f"{MIN_RESIZED_SIDE} pixels"
            )
        return super().__call__(image)


def list_images(inputs: Iterable[str]) -> List[Path]:
    """Image files named in ``inputs``, folders expanded (sorted); ``FileNotFoundError``
    naming any path that does not exist."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input image or folder not found: {item}")
    return files


def visualize_predictions(predictor: DefaultPredictor, files: Iterable[Path], output_dir: str,
                          score_threshold: float = 0.3) -> List[str]:
    """Runs ``predictor`` on every file (read by OpenCV at any depth, converted by
    :func:`to_bgr_uint8`) and writes ``<output_dir>/<stem>.png`` with the detections scoring
    at least ``score_threshold`` drawn on the image.

    Returns:
        the written paths.
    """
    os.makedirs(output_dir, exist_ok=True)
    dataset = predictor.cfg.DATASETS.TEST[0] if len(predictor.cfg.DATASETS.TEST) else "__unused"
    metadata = MetadataCatalog.get(dataset)
    written = []
    for path in files:
        # Any depth and channel count (16-bit PNGs, grayscale), converted like DinoPredictor's input.
        image = cv2.imread(str(path), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
        if image is None:
            raise ValueError(f"cannot read image file {path}")
        image_bgr = to_bgr_uint8(image)
        instances = predictor(image_bgr)["instances"].to("cpu")
        instances = instances[instances.scores >= score_threshold]
        drawing = Visualizer(image_bgr[:, :, ::-1], metadata).draw_instance_predictions(instances)
        target = os.path.join(output_dir, f"{Path(path).stem}.png")
        cv2.imwrite(target, drawing.get_image()[:, :, ::-1])
        written.append(target)
    return written
