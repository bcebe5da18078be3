#!/usr/bin/env python
"""Train or evaluate DINO from a LazyConfig (``configs/*.py``), as Detectron2's and detrex's
``tools/lazyconfig_train_net.py`` do, with this project's training pieces: full-model gradient
clipping that stops on a non-finite norm (``train.clip_grad``), AMP in float16 or bfloat16
(``train.amp``), EMA weights (``train.model_ema``), and a checkpointer that loads no code from
weight files and never saves NaN weights (``train.init_checkpoint`` takes what ``MODEL.WEIGHTS`` takes).

    python tools/lazyconfig_train_net.py --config-file configs/dino_r50_4scale.py
    python tools/lazyconfig_train_net.py --config-file configs/dino_r50_4scale.py --num-gpus 8 \
        train.output_dir=output/r50 dataloader.train.total_batch_size=16
    python tools/lazyconfig_train_net.py --config-file configs/dino_r50_4scale.py --eval-only \
        train.init_checkpoint=model.pth
"""

import contextlib
import logging

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (
    SimpleTrainer,
    create_ddp_model,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
    launch,
)
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

import dino_detr.data  # noqa: F401  (registers the demo datasets)
from dino_detr import resolve_device
from dino_detr.checkpoint import SafeCheckpointer
from dino_detr.engine import (
    AMP_PRECISIONS,
    EMAHook,
    FiniteCheckpointer,
    MixedPrecisionTrainer,
    ModelEMA,
    add_full_model_clipping,
    lock_output_dir,
)

logger = logging.getLogger("detectron2")


def do_test(cfg, model, ema=None):
    """Evaluates ``model`` (its EMA weights when ``ema``) with ``dataloader.test`` and ``.evaluator``."""
    if "evaluator" not in cfg.dataloader:
        return {}
    with ema.apply_to(model) if ema is not None else contextlib.nullcontext():
        results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    print_csv_format(results)
    return results


def do_train(args, cfg):
    """Detectron2's LazyConfig training loop (see its tools/lazyconfig_train_net.py) with the pieces above."""
    model = instantiate(cfg.model).to(cfg.train.device)
    logger.info(f"Model:\n{model}")
    cfg.optimizer.params.model = model
    clip = cfg.train.clip_grad
    optimizer = add_full_model_clipping(
        instantiate(cfg.optimizer),
        clip.params.max_norm if clip.enabled else float("inf"),
        clip.params.get("norm_type", 2.0),
        cfg.train.output_dir,
    )
    train_loader = instantiate(cfg.dataloader.train)
    ema = ModelEMA(model, cfg.train.model_ema.decay) if cfg.train.model_ema.enabled else None
    model = create_ddp_model(model, **cfg.train.ddp)
    if cfg.train.amp.enabled:
        if cfg.train.amp.precision not in AMP_PRECISIONS:
            raise ValueError(
                f"train.amp.precision must be one of {list(AMP_PRECISIONS)}, got {cfg.train.amp.precision!r}"
            )
        precision = AMP_PRECISIONS[cfg.train.amp.precision]
        trainer = MixedPrecisionTrainer(model, train_loader, optimizer, precision, torch.device(cfg.train.device).type)
    else:
        trainer = SimpleTrainer(model, train_loader, optimizer)
    checkpointer = FiniteCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    if ema is not None:
        checkpointer.add_checkpointable("model_ema", ema)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            EMAHook(ema) if ema is not None else None,
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model, ema)),
            hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
            if comm.is_main_process()
            else None,
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    cfg.train.device = resolve_device(cfg.train.device)
    if not args.eval_only:
        lock_output_dir(cfg.train.output_dir)  # one training per folder; before default_setup writes there
    default_setup(cfg, args)
    if args.eval_only:
        model = instantiate(cfg.model).to(cfg.train.device)
        ema = ModelEMA(model, cfg.train.model_ema.decay) if cfg.train.model_ema.enabled else None
        checkpointer = SafeCheckpointer(model, **({"model_ema": ema} if ema is not None else {}))
        checkpointer.load(cfg.train.init_checkpoint)
        return do_test(cfg, create_ddp_model(model), ema)
    return do_train(args, cfg)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
