#!/usr/bin/env python
"""Convert a published DINO checkpoint into a Detectron2 checkpoint of this project's model.

    python tools/convert_checkpoint.py --source official checkpoint0011_4scale.pth dino_r50_4scale_12ep.pth
    python tools/convert_checkpoint.py --source detrex dino_r50_4scale_12ep_49_2AP.pth dino_detrex_r50_4scale.pth
    python tools/convert_checkpoint.py --source mmdet dino-4scale_r50_8xb2-12e_coco_20221202_182705-55b2bba2.pth out.pth
    python tools/convert_checkpoint.py --source swin-imagenet swin_large_patch4_window12_384_22k.pth swinl_22k.pth

The classifier rows are remapped to Detectron2's 80 contiguous COCO classes (``--classes coco80``,
what ``coco_2017_val`` evaluation needs) or kept as stored (``--classes source``: 91 COCO ids for
official checkpoints). ``swin-imagenet`` converts an ImageNet Swin classifier into backbone-only
weights to train DINO from (``MODEL.WEIGHTS`` of a Swin config). The converted weights are loaded
strictly into the model built from the matching config (unless ``--no-verify``), and the config file
and options to use are printed.
Without ``--source`` the layout is recognised from the tensor names (as ``MODEL.WEIGHTS`` does on
load, with the same code: converting by hand is only needed to keep a converted file). For
mmdetection the position embedding is read from the config stored in the checkpoint (``meta``).
The input is read with ``torch.load(weights_only=True)``; a trusted older file that needs more is
allowed by naming it in ``DINO_DETR_TRUSTED_WEIGHTS`` (see the README).
"""

import argparse
import os
import sys

from dino_detr.checkpoint import (
    CLASS_LAYOUTS,
    SOURCES,
    check_against_model,
    convert_state_dict,
    layout_of,
    load_source_state_dict,
    mmdet_source_config,
    save_detectron2_checkpoint,
)

from user_errors import run_tool

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build_cfg(config_file: str, opts):
    from dino_detr import get_dino_cfg

    cfg = get_dino_cfg(config_file, opts)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def changed_opts(conversion, config_file: str):
    """The inferred config keys whose value differs from ``config_file``."""
    cfg = build_cfg(config_file, [])
    opts = []
    for key, value in conversion.config.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        if (list(node) if isinstance(node, (list, tuple)) else node) != value:
            opts += [key, str(value).replace(" ", "")]
    return opts


def verify(conversion, config_file: str, opts) -> None:
    """Builds the model of ``config_file`` + ``opts`` and checks names and shapes one by one
    (backbone-only weights: everything but the detector and the per-stage Swin norms)."""
    from detectron2.modeling import build_model

    check_against_model(conversion.state_dict, build_model(build_cfg(config_file, opts)), conversion.backbone_only)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--source", choices=SOURCES, help="who published the checkpoint (default: recognised from the tensor names)"
    )
    parser.add_argument("input", help="source checkpoint (.pth)")
    parser.add_argument("output", help="Detectron2 checkpoint to write (.pth)")
    parser.add_argument(
        "--classes",
        default="coco80",
        choices=CLASS_LAYOUTS,
        help="coco80: Detectron2's contiguous COCO classes (default); source: rows as stored",
    )
    parser.add_argument(
        "--config-file",
        default=None,
        help="config to verify against (default: the repository config matching the weights)",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the strict load into a freshly built model")
    args = parser.parse_args(argv)

    state, rest = load_source_state_dict(args.input, with_rest=True)
    source = args.source or layout_of(state)
    if source not in SOURCES:
        parser.error(f"{args.input}: no official / detrex / mmdet DINO tensor names found: give --source")
    source_config = mmdet_source_config(rest.get("meta")) if source == "mmdet" else None
    conversion = convert_state_dict(state, source, args.classes, source_config)
    config_file = args.config_file or os.path.join(REPO, conversion.base_config)
    opts = changed_opts(conversion, config_file)
    if not args.no_verify:
        verify(conversion, config_file, opts)
    save_detectron2_checkpoint(conversion.state_dict, args.output)

    print(
        f"wrote {args.output}: {len(conversion.state_dict)} tensors"
        f"{'' if args.no_verify else ', strict load into the model verified'}"
    )
    for note in conversion.notes:
        print(f"  - {note}")
    print("train from it with:" if conversion.backbone_only else "evaluate with:")
    shown = os.path.relpath(config_file, REPO)
    shown = config_file if shown.startswith("..") else shown
    print(
        f"  python tools/train_net.py --config-file {shown}{'' if conversion.backbone_only else ' --eval-only'} "
        f"MODEL.WEIGHTS {args.output} {' '.join(opts)}".rstrip()
    )


if __name__ == "__main__":
    sys.exit(run_tool(main))
