"""Training pieces of the DINO project: optimizer, NaN guard, EMA, reseeding, resumable
data stream, the ``OUTPUT_DIR`` lock and the ``DinoTrainer`` that combines them."""

from .amp import AMP_PRECISIONS, MixedPrecisionTrainer, amp_precision
from .ema import EMAHook, ModelEMA
from .nan_guard import FiniteCheckpointer, check_finite_grad_norm
from .optimizer import add_full_model_clipping, build_dino_optimizer, dino_param_groups
from .predict import DinoPredictor, to_bgr_uint8
from .run_lock import OutputDirInUseError, lock_output_dir
from .seeding import IterationSeedHook
from .train_loader import ResumableTrainingSampler, build_dino_train_loader
from .trainer import DinoTrainer

__all__ = [
    "AMP_PRECISIONS",
    "MixedPrecisionTrainer",
    "amp_precision",
    "EMAHook",
    "ModelEMA",
    "FiniteCheckpointer",
    "check_finite_grad_norm",
    "add_full_model_clipping",
    "build_dino_optimizer",
    "dino_param_groups",
    "DinoPredictor",
    "to_bgr_uint8",
    "OutputDirInUseError",
    "lock_output_dir",
    "IterationSeedHook",
    "ResumableTrainingSampler",
    "build_dino_train_loader",
    "DinoTrainer",
]
