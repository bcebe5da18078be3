#!/usr/bin/env python
"""Train or evaluate DINO with Detectron2.

    python tools/train_net.py --config-file configs/dino_r50_4scale.yaml
    python tools/train_net.py --config-file configs/dino_r50_4scale.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/dino_r50_4scale.yaml --resume
    python tools/train_net.py --config-file configs/dino_r50_4scale.yaml --eval-only MODEL.WEIGHTS model.pth
    python tools/train_net.py --config-file configs/dino_r50_4scale.yaml --dataset mine_train=train.json:images/ \
        DATASETS.TRAIN "('mine_train',)" MODEL.DINO.NUM_CLASSES 3           # a COCO-format dataset
"""

import copy
import sys

from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import dino_detr.data  # noqa: F401  (registers the demo datasets)
from dino_detr import config_file_path, get_dino_cfg, resolve_device
from dino_detr.data import parse_dataset_option, register_config_datasets
from dino_detr.engine import DinoTrainer, FiniteCheckpointer, ModelEMA, lock_output_dir

from user_errors import run_tool


def argument_parser():
    """Detectron2's ``default_argument_parser`` with ``--dataset NAME=JSON:FOLDER`` (repeatable),
    added to ``DATASETS.COCO``."""
    parser = default_argument_parser()
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME=JSON:FOLDER",
        help="register a COCO-format dataset: annotation JSON and image folder",
    )
    return parser


def setup(args):
    cfg = get_dino_cfg(args.config_file, args.opts)
    cfg.MODEL.DEVICE = resolve_device(cfg.MODEL.DEVICE)
    cfg.DATASETS.COCO = list(cfg.DATASETS.COCO) + [parse_dataset_option(d) for d in args.dataset]
    cfg.freeze()
    if not args.eval_only:
        lock_output_dir(cfg.OUTPUT_DIR)  # one training per folder; before default_setup writes config.yaml
    # default_setup logs the config file's text: for a dino_detr:// name, the YAML file it stands for
    setup_args = copy.copy(args)
    setup_args.config_file = config_file_path(args.config_file)
    default_setup(cfg, setup_args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="dino_detr")  # the project's messages too
    register_config_datasets(cfg)
    return cfg


def evaluate_checkpoint(cfg, resume: bool):
    """Loads MODEL.WEIGHTS (or the last checkpoint with ``resume``) and evaluates it; with
    MODEL_EMA.ENABLED the checkpoint's EMA weights are evaluated."""
    model = DinoTrainer.build_model(cfg)
    checkpointer = FiniteCheckpointer(model, save_dir=cfg.OUTPUT_DIR, reinit_class_tensors=False)
    ema = ModelEMA(model, cfg.MODEL_EMA.DECAY) if cfg.MODEL_EMA.ENABLED else None
    if ema is not None:
        checkpointer.add_checkpointable("model_ema", ema)
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
    if ema is not None:
        model.load_state_dict(ema.state_dict())
    results = DinoTrainer.test(cfg, model)
    if comm.is_main_process():
        verify_results(cfg, results)
    return results


def main(args):
    cfg = setup(args)
    if args.eval_only:
        return evaluate_checkpoint(cfg, args.resume)
    trainer = DinoTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    status = run_tool(
        launch,
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
    sys.exit(status)
