"""The visualisation loop of ``tools/demo.py`` and ``tools/run_demo.py``: find image files, run a
predictor on images or video frames and save Detectron2 ``Visualizer`` / ``VideoVisualizer``
drawings."""

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

__all__ = ["dataset_metadata", "list_images", "open_video", "output_names", "visualize_predictions", "visualize_video"]

logger = logging.getLogger("dino_detr.demo")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Video containers and the codec OpenCV writes into each.
VIDEO_CODECS = {".mp4": "mp4v", ".avi": "MJPG"}


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


def visualize_predictions(
    predictor: DefaultPredictor, files: Iterable[Path], output_dir: str, score_threshold: float = 0.3
) -> List[str]:
    """Runs ``predictor`` on every file and writes one PNG per file into ``output_dir``
    (names from :func:`output_names`) with the detections scoring at least
    ``score_threshold`` drawn on the image; ``OSError`` naming a file that cannot be written.
    A file that cannot be read (truncated, corrupt, not an image) is skipped with one warning
    naming it and why.

    Returns:
        the written paths (fewer than ``files`` when some were skipped).
    """
    files = list(files)
    os.makedirs(output_dir, exist_ok=True)
    metadata = dataset_metadata(predictor.cfg)
    written = []
    for path, name in zip(files, output_names(files)):
        try:
            image_bgr = read_image(str(path), format="BGR")
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
            logger.warning(f"skipped {path}: unreadable image ({type(e).__name__}: {e})")
            continue
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


def visualize_video(
    predictor: DefaultPredictor,
    capture: cv2.VideoCapture,
    output: str,
    score_threshold: float = 0.3,
    max_frames: int = 0,
) -> Tuple[int, float]:
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
