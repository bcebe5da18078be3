#!/usr/bin/env python
"""Run a trained DINO on images, a video file or a camera and save the visualized detections.

    python tools/demo.py --config-file CFG --input img.png folder/ "more/*.jpg" --output vis/ MODEL.WEIGHTS m.pth
    python tools/demo.py --config-file CFG --video-input in.mp4 --output out.mp4 MODEL.WEIGHTS m.pth
    python tools/demo.py --config-file CFG --webcam 0 --output cam.avi [--max-frames 300] MODEL.WEIGHTS m.pth

Class names come from the metadata of DATASETS.TEST[0] (a training run's OUTPUT_DIR/config.yaml
names its datasets); trailing KEY VALUE pairs override the config as in tools/train_net.py.
"""

import argparse
import logging
import os
import sys

from detectron2.config import get_cfg
from detectron2.utils.logger import setup_logger

import dino_detr.data  # noqa: F401  (registers the demo datasets' class names)
from dino_detr import add_dino_config, get_dino_cfg, resolve_device
from dino_detr.data import parse_dataset_option, register_config_datasets
from dino_detr.engine import DinoPredictor

from cpu_allocator import reuse_freed_cpu_memory
from user_errors import run_tool
from visualization import list_images, open_video, visualize_predictions, visualize_video

logger = logging.getLogger("dino_detr.demo")


def _first_config_key(argv) -> int:
    """Index of the first token of ``argv`` that names a config key (e.g. ``MODEL.WEIGHTS``), or len(argv)."""
    defaults = get_cfg()
    add_dino_config(defaults)

    def is_key(token: str) -> bool:
        node = defaults
        for part in token.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    return next((i for i, token in enumerate(argv) if is_key(token)), len(argv))


def parse_args(argv=None):
    """Options, then the trailing config overrides: everything from the first config key on
    (e.g. ``MODEL.WEIGHTS``), since ``--input`` takes any number of paths."""
    argv = list(sys.argv[1:] if argv is None else argv)
    start = _first_config_key(argv)
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [options] [KEY VALUE ...]",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files, folders of images and/or glob patterns")
    source.add_argument("--video-input", metavar="FILE", help="a video file")
    source.add_argument("--webcam", type=int, metavar="INDEX", help="a camera index (e.g. 0)")
    parser.add_argument(
        "--output",
        required=True,
        help="folder for the visualized PNGs (images), or the .mp4/.avi file (video, camera; "
        "a folder gets <video name>.mp4)",
    )
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME=JSON:FOLDER",
        help="register a COCO-format dataset (added to DATASETS.COCO), e.g. for its class names",
    )
    parser.add_argument("--confidence-threshold", type=float, default=0.3)
    parser.add_argument(
        "--max-frames", type=int, default=0, help="video/camera: stop after N frames (0: at the end; Ctrl-C also stops)"
    )
    args = parser.parse_args(argv[:start])
    args.opts = argv[start:]
    return args


def _video_output(args) -> str:
    if not os.path.isdir(args.output):
        return args.output
    stem = os.path.splitext(os.path.basename(args.video_input or f"camera{args.webcam}"))[0]
    return os.path.join(args.output, f"{stem}.mp4")


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="dino_detr")
    datasets = [parse_dataset_option(d) for d in args.dataset]
    cfg = get_dino_cfg(args.config_file, args.opts)
    cfg.MODEL.DEVICE = resolve_device(cfg.MODEL.DEVICE)
    cfg.DATASETS.COCO = list(cfg.DATASETS.COCO) + datasets
    cfg.freeze()
    register_config_datasets(cfg)
    if not cfg.MODEL.WEIGHTS:
        logger.warning(
            "MODEL.WEIGHTS is empty: the model has random weights and its detections mean nothing; "
            "add MODEL.WEIGHTS path/to/model_final.pth"
        )
    if cfg.MODEL.DEVICE == "cpu":
        reuse_freed_cpu_memory()  # this process only runs the model: keep freed activations for reuse
    predictor = DinoPredictor(cfg)
    if args.input is not None:
        files = list_images(args.input)
        if not files:
            raise FileNotFoundError(f"no image files in {args.input}")
        written = visualize_predictions(predictor, files, args.output, args.confidence_threshold)
        print(f"wrote {len(written)} visualization(s) to {args.output}")
        if len(written) < len(files):
            raise OSError(f"{len(files) - len(written)} of {len(files)} input images could not be read (named above)")
        return written
    source = args.video_input if args.video_input is not None else args.webcam
    output = _video_output(args)
    frames, seconds = visualize_video(predictor, open_video(source), output, args.confidence_threshold, args.max_frames)
    print(f"{frames} frame(s) in {seconds:.1f} s ({frames / max(seconds, 1e-9):.2f} fps); wrote {output}")
    return output


if __name__ == "__main__":
    sys.exit(run_tool(main))
