#!/usr/bin/env python
"""The project's demo (``make demo``): generate the embedded shapes dataset if missing,
train DINO on it with configs/dino_demo.yaml, evaluate on dino_demo_val (the AP table is
printed) and write visualized validation predictions as PNGs.

    python tools/run_demo.py [--output-dir output/dino_demo] [--num-vis 12] [KEY VALUE ...]

Uses the GPU when there is one (MODEL.DEVICE "cuda" falls back to the CPU without one).
"""

import argparse
import json
import os
import time

from detectron2.data import MetadataCatalog
from detectron2.utils.logger import setup_logger

import dino_detr.data  # noqa: F401  (registers dino_demo_train / dino_demo_val)
from dino_detr import get_dino_cfg, resolve_device
from dino_detr.data import ensure_demo_dataset
from dino_detr.engine import DinoPredictor, DinoTrainer

from visualization import list_images, visualize_predictions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=os.path.join(REPO, "configs", "dino_demo.yaml"))
    parser.add_argument("--output-dir", default=os.path.join(REPO, "output", "dino_demo"))
    parser.add_argument("--num-vis", type=int, default=12, help="validation images to visualize")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = get_dino_cfg(args.config_file, args.opts)
    cfg.MODEL.DEVICE = resolve_device(cfg.MODEL.DEVICE)
    cfg.OUTPUT_DIR = args.output_dir
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    setup_logger(cfg.OUTPUT_DIR)
    setup_logger(cfg.OUTPUT_DIR, name="dino_detr")

    root = ensure_demo_dataset()
    print(f"demo dataset: {root}; device: {cfg.MODEL.DEVICE}", flush=True)

    trainer = DinoTrainer(cfg)
    trainer.resume_or_load(resume=False)
    start = time.perf_counter()
    trainer.train()  # ends with the evaluation on DATASETS.TEST (AP table in the log)
    train_seconds = time.perf_counter() - start
    seconds_per_iter = trainer.storage.history("time").global_avg()  # Detectron2's IterationTimer
    results = trainer._last_eval_results if hasattr(trainer, "_last_eval_results") else trainer.evaluate()
    bbox = results["bbox"]

    vis_cfg = cfg.clone()
    vis_cfg.defrost()
    vis_cfg.MODEL.WEIGHTS = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    vis_cfg.freeze()
    val_images = list_images([MetadataCatalog.get(cfg.DATASETS.TEST[0]).image_root])[: args.num_vis]
    vis_dir = os.path.join(cfg.OUTPUT_DIR, "visualizations")
    written = visualize_predictions(DinoPredictor(vis_cfg), val_images, vis_dir)

    summary = {
        "bbox": bbox,
        "train_and_eval_seconds": round(train_seconds, 1),
        "seconds_per_iteration": round(seconds_per_iter, 3),
        "device": cfg.MODEL.DEVICE,
        "max_iter": cfg.SOLVER.MAX_ITER,
        "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH,
    }
    with open(os.path.join(cfg.OUTPUT_DIR, "demo_results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("\nDINO demo on dino_demo_val (COCO bbox metrics):")
    print("| " + " | ".join(bbox) + " |")
    print("|" + "---|" * len(bbox))
    print("| " + " | ".join(f"{v:.1f}" for v in bbox.values()) + " |")
    print(
        f"training + evaluation: {train_seconds / 60:.1f} min on {cfg.MODEL.DEVICE} "
        f"({seconds_per_iter:.2f} s/iteration); "
        f"{len(written)} visualizations in {vis_dir}"
    )


if __name__ == "__main__":
    main()
