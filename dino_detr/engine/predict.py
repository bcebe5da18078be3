"""Inference helpers shared by ``tools/demo.py`` and ``tools/run_demo.py``: find image files,
run a ``DefaultPredictor`` and save Detectron2 ``Visualizer`` drawings."""
import os
from pathlib import Path
from typing import Iterable, List

import cv2
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import Visualizer

__all__ = ["list_images", "visualize_predictions"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


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
    """Runs ``predictor`` on every file and writes ``<output_dir>/<stem>.png`` with the
    detections scoring at least ``score_threshold`` drawn on the image.

    Returns:
        the written paths.
    """
    os.makedirs(output_dir, exist_ok=True)
    dataset = predictor.cfg.DATASETS.TEST[0] if len(predictor.cfg.DATASETS.TEST) else "__unused"
    metadata = MetadataCatalog.get(dataset)
    written = []
    for path in files:
        image_bgr = read_image(str(path), format="BGR")
        instances = predictor(image_bgr)["instances"].to("cpu")
        instances = instances[instances.scores >= score_threshold]
        drawing = Visualizer(image_bgr[:, :, ::-1], metadata).draw_instance_predictions(instances)
        target = os.path.join(output_dir, f"{Path(path).stem}.png")
        cv2.imwrite(target, drawing.get_image()[:, :, ::-1])
        written.append(target)
    return written
