#!/usr/bin/env python
"""Export DINO's inference path: torch.export (.pt2), an AOTInductor package (.pt2) or ONNX (.onnx).

    python tools/export_model.py --config-file configs/dino_r50_4scale.yaml --format onnx \\
        --output dino.onnx MODEL.WEIGHTS weights/dino_r50_4scale_12ep.pth

Inputs of the exported model: ``images`` (N, 3, H, W) float32, normalized and zero-padded,
H and W multiples of 32 in [320, 1344]; ``image_sizes`` (N, 2) int64 valid (h, w). Outputs:
``boxes`` (N, NUM_SELECT, 4) xyxy in input pixels, ``scores``, ``classes``. See README ("Export").
"""

import argparse
import sys

import torch
from detectron2.modeling import build_model

from dino_detr import get_dino_cfg
from dino_detr.checkpoint import SafeCheckpointer
from dino_detr.export import SIZE_RANGE, compile_aoti, export_detector, export_onnx, save_program

from user_errors import run_tool

WRITERS = {"torch-export": save_program, "aoti": compile_aoti, "onnx": export_onnx}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", required=True, choices=sorted(WRITERS))
    parser.add_argument("--output", required=True, help="file to write (.pt2 or .onnx)")
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=[800, 1216],
        metavar=("H", "W"),
        help="example input size (multiples of 32); the export works for all sizes in the range",
    )
    parser.add_argument(
        "--size-range",
        type=int,
        nargs=2,
        default=list(SIZE_RANGE),
        metavar=("MIN", "MAX"),
        help="smallest and largest H and W the exported model accepts",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = get_dino_cfg(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    model = build_model(cfg).eval()
    SafeCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    program = export_detector(model, tuple(args.size), tuple(args.size_range))
    path = WRITERS[args.format](program, args.output)
    print(f"wrote {args.format} to {path}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(run_tool(main))
