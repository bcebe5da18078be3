"""``DinoTrainer``: Detectron2's ``DefaultTrainer`` with DINO's data, optimizer, EMA and
safety hooks. Checkpointing, resume, periodic evaluation, metric printing and TensorBoard
events are Detectron2's own."""

import contextlib
import os
import weakref

import torch
from detectron2.data import build_detection_test_loader
from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import COCOEvaluator

from dino_detr.compat import TRAINER_CHECKPOINTS_LOOP_STATE, has_fast_coco_eval, start_data_loader
from dino_detr.data import DinoDatasetMapper

from .amp import MixedPrecisionTrainer, amp_precision
from .ema import EMAHook, ModelEMA
from .nan_guard import FiniteCheckpointer
from .optimizer import build_dino_optimizer
from .run_lock import lock_output_dir
from .seeding import IterationSeedHook
from .train_loader import build_dino_train_loader

__all__ = ["DinoTrainer"]


class DinoTrainer(DefaultTrainer):
    """Trains a DINO model configured by ``cfg`` (see ``tools/train_net.py``).

    Additions to ``DefaultTrainer``: :class:`DinoDatasetMapper` loaders, AdamW with the
    backbone multiplier and full-model clipping, a checkpointer that never writes NaN
    weights, optional EMA (``MODEL_EMA``, stored as ``model_ema`` in checkpoints and used
    for evaluation), per-iteration reseeding when ``SEED >= 0``, a data stream that
    resumes where the interrupted run stopped, and optimizer (+ AMP scaler) state in
    checkpoints also with Detectron2 v0.6. One run per ``OUTPUT_DIR`` (a lock file, see
    :func:`lock_output_dir`). ``SOLVER.AMP`` trains in float16 (with a grad scaler) or
    bfloat16 (``SOLVER.AMP.PRECISION``) on CUDA and on the CPU.
    """

    def __init__(self, cfg):
        precision = amp_precision(cfg)  # a bad SOLVER.AMP.PRECISION fails before anything is built or written
        lock_output_dir(cfg.OUTPUT_DIR)  # before anything is written there
        super().__init__(cfg)
        if cfg.SOLVER.AMP.ENABLED:  # in place of Detectron2's AMPTrainer
            loop = self._trainer
            self._trainer = MixedPrecisionTrainer(
                loop.model, loop.data_loader, loop.optimizer, precision, torch.device(cfg.MODEL.DEVICE).type
            )
        start_data_loader(self._trainer)  # before training, on every Detectron2 version (see dino_detr.compat)

    def build_hooks(self):
        # Runs at the end of DefaultTrainer.__init__, before the default hooks capture
        # the checkpointer.
        self.checkpointer = FiniteCheckpointer(self.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.ema = None
        if self.cfg.MODEL_EMA.ENABLED:
            self.ema = ModelEMA(self.model, self.cfg.MODEL_EMA.DECAY)
            self.checkpointer.add_checkpointable("model_ema", self.ema)
        default = super().build_hooks()
        result = [IterationSeedHook(self.cfg.SEED)] if self.cfg.SEED >= 0 else []
        for hook in default:
            if isinstance(hook, hooks.EvalHook):
                hook = hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self.evaluate)
            result.append(hook)
            if isinstance(hook, hooks.LRScheduler) and self.ema is not None:
                result.append(EMAHook(self.ema))  # after the step, before checkpoint / eval
        return result

    def evaluate(self):
        """Evaluates on ``DATASETS.TEST`` (with the EMA weights when enabled)."""
        with self.ema.apply_to(self.model) if self.ema is not None else contextlib.nullcontext():
            self._last_eval_results = self.test(self.cfg, self.model)
        return self._last_eval_results

    def resume_or_load(self, resume: bool = True):
        super().resume_or_load(resume=resume)
        if self.start_iter > 0:
            start_data_loader(self._trainer, self.build_train_loader(self.cfg, self.start_iter))

    def state_dict(self):
        state = super().state_dict()
        if not TRAINER_CHECKPOINTS_LOOP_STATE:
            state["_trainer"] = self._trainer.state_dict()
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if not TRAINER_CHECKPOINTS_LOOP_STATE and "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_dino_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg, start_iter: int = 0):
        return build_dino_train_loader(cfg, start_iter)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=DinoDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """Detectron2's ``COCOEvaluator``, with its fast (C++) evaluation where Detectron2's compiled
        ops are installed (:func:`dino_detr.compat.has_fast_coco_eval`), else pycocotools'."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=has_fast_coco_eval())
