#!/usr/bin/env python
"""Run a trained DINO on image files or folders and save the visualized detections.

    python tools/demo.py --config-file configs/dino_demo.yaml --input img.png folder/ \
        --output vis/ --opts MODEL.WEIGHTS output/dino_demo/model_final.pth
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.utils.logger import setup_logger  # noqa: E402

import dino_detr.data  # noqa: E402,F401  (registers the demo datasets' class names)
from dino_detr import get_dino_cfg, resolve_device  # noqa: E402
from dino_detr.engine import DinoPredictor, list_images, visualize_predictions  # noqa: E402
from dino_detr.utils import reuse_freed_cpu_memory  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", required=True, help="image files and/or folders of images")
    parser.add_argument("--output", required=True, help="folder for the visualized PNGs")
    parser.add_argument("--confidence-threshold", type=float, default=0.3)
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="dino_detr")
    cfg = get_dino_cfg(args.config_file, args.opts)
    cfg.MODEL.DEVICE = resolve_device(cfg.MODEL.DEVICE)
    cfg.freeze()
    if cfg.MODEL.DEVICE == "cpu":
        reuse_freed_cpu_memory()  # this process only runs the model: keep freed activations for reuse
    files = list_images(args.input)
    if not files:
        raise FileNotFoundError(f"no image files in {args.input}")
    written = visualize_predictions(DinoPredictor(cfg), files, args.output, args.confidence_threshold)
    print(f"wrote {len(written)} visualization(s) to {args.output}")


if __name__ == "__main__":
    main()
