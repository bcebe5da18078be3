"""Inference helpers shared by ``tools/demo.py`` and ``tools/run_demo.py``: ``DinoPredictor``
(Detectron2's ``DefaultPredictor`` that accepts more image formats), finding image files,
running a predictor on images or video frames and saving Detectron2 ``Visualizer`` /
``VideoVisualizer`` drawings."""
import glob
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, List, Tuple, Union

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import Visualizer

from dino_detr.data import read_image

__all__ = ["DinoPredictor", "MIN_RESIZED_SIDE", "dataset_metadata", "list_images", "open_video", "output_names",
           "to_bgr_uint8", "visualize_predictions", "visualize_video"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Video containers and the codec OpenCV writes into each.
VIDEO_CODECS = {".mp4": "mp4v", ".avi": "MJPG"}

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
    """Image files named in ``inputs``: files, folders (expanded, sorted) and glob patterns
    (``"images/*.jpg"``, sorted); ``FileNotFoundError`` naming an input that matches nothing."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(item) and glob.glob(item):
            files.extend(sorted(Path(p) for p in glob.glob(item) if Path(p).is_file()))
        else:
            raise FileNotFoundError(f"input image, folder or pattern not found: {item}")
    return files


def output_names(files: List[Path]) -> List[str]:
    """One distinct ``.png`` name per input file: ``x.png`` for ``x.jpg``; ``x.jpg.png`` and
    ``x.png.png`` when ``x.jpg`` and ``x.png`` are both given; ``-<index>`` added when even
    the full names repeat (files of the same name in several folders)."""
    stems = Counter(Path(f).stem for f in files)
    names = [f"{Path(f).stem if stems[Path(f).stem] == 1 else Path(f).name}.png" for f in files]
    repeated = Counter(names)
    return [f"{Path(n).stem}-{i}.png" if repeated[n] > 1 else n for i, n in enumerate(names)]


def dataset_metadata(cfg):
    """Metadata (class names) for drawing: that of ``DATASETS.TEST[0]``, loaded first when
    its ``thing_classes`` are only known after loading (COCO datasets from ``DATASETS.COCO``)."""
    if not len(cfg.DATASETS.TEST):
        return MetadataCatalog.get("__unused")
    name = cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(name)
    if metadata.get("thing_classes") is None and name in DatasetCatalog.list():
        DatasetCatalog.get(name)
    return metadata


def visualize_predictions(predictor: DefaultPredictor, files: Iterable[Path], output_dir: str,
                          score_threshold: float = 0.3) -> List[str]:
    """Runs ``predictor`` on every file and writes one PNG per file into ``output_dir``
    (names from :func:`output_names`) with the detections scoring at least
    ``score_threshold`` drawn on the image; ``OSError`` naming a file that cannot be written.

    Returns:
        the written paths.
    """
    files = list(files)
    os.makedirs(output_dir, exist_ok=True)
    metadata = dataset_metadata(predictor.cfg)
    written = []
    for path, name in zip(files, output_names(files)):
        image_bgr = read_image(str(path), format="BGR")
        instances = predictor(image_bgr)["instances"].to("cpu")
        instances = instances[instances.scores >= score_threshold]
        drawing = Visualizer(image_bgr[:, :, ::-1], metadata).draw_instance_predictions(instances)
        target = os.path.join(output_dir, name)
        if not cv2.imwrite(target, drawing.get_image()[:, :, ::-1]):
            raise OSError(f"could not write {target} (the visualization of {path})")
        written.append(target)
    return written


def open_video(source: Union[str, int]) -> cv2.VideoCapture:
    """``cv2.VideoCapture`` of a video file or a camera index; ``FileNotFoundError`` /
    ``OSError`` naming a source OpenCV cannot open."""
    if isinstance(source, str) and not os.path.isfile(source):
        raise FileNotFoundError(f"video file not found: {source}")
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        kind = "video file" if isinstance(source, str) else "camera index"
        raise OSError(f"OpenCV cannot open the {kind} {source}")
    return capture


def _video_writer(path: str, fps: float, width: int, height: int) -> cv2.VideoWriter:
    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_CODECS:
        raise ValueError(f"video output {path}: use one of {sorted(VIDEO_CODECS)}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*VIDEO_CODECS[suffix]), fps, (width, height))
    if not writer.isOpened():
        raise OSError(f"OpenCV cannot write the video {path} (codec {VIDEO_CODECS[suffix]})")
    return writer


def visualize_video(predictor: DefaultPredictor, capture: cv2.VideoCapture, output: str,
                    score_threshold: float = 0.3, max_frames: int = 0) -> Tuple[int, float]:
    """Runs ``predictor`` on the frames of ``capture`` and writes them with the detections
    drawn (``VideoVisualizer``, stable colours per track) to the video file ``output``
    (".mp4" or ".avi", the source's frame rate). Ctrl-C stops early and keeps the video.

    Args:
        max_frames: stop after this many frames (0: until the source ends).
    Returns:
        (frames processed, seconds taken).
    """
    visualizer = VideoVisualizer(dataset_metadata(predictor.cfg))
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
    writer = None
    frames, start = 0, time.perf_counter()
    try:
        while not max_frames or frames < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            instances = predictor(frame)["instances"].to("cpu")
            instances = instances[instances.scores >= score_threshold]
            drawn = visualizer.draw_instance_predictions(frame[:, :, ::-1], instances).get_image()[:, :, ::-1]
            writer = writer or _video_writer(output, fps, drawn.shape[1], drawn.shape[0])
            writer.write(np.ascontiguousarray(drawn))
            frames += 1
    except KeyboardInterrupt:
        logger.info(f"interrupted after {frames} frame(s); {output} keeps them")
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    return frames, time.perf_counter() - start
