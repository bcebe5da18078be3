"""Training pieces of the DINO project: optimizer, NaN guard, EMA, reseeding, resumable
data stream and the ``DinoTrainer`` that combines them."""
from .ema import EMAHook, ModelEMA
from .nan_guard import FiniteCheckpointer, check_finite_grad_norm
from .optimizer import build_dino_optimizer, dino_param_groups
from .predict import dataset_metadata, list_images, open_video, output_names, visualize_predictions, visualize_video
from .seeding import IterationSeedHook
from .train_loader import ResumableTrainingSampler, build_dino_train_loader
from .trainer import DinoTrainer

__all__ = [
    "EMAHook",
    "ModelEMA",
    "FiniteCheckpointer",
    "check_finite_grad_norm",
    "build_dino_optimizer",
    "dino_param_groups",
    "dataset_metadata",
    "list_images",
    "open_video",
    "output_names",
    "visualize_predictions",
    "visualize_video",
    "IterationSeedHook",
    "ResumableTrainingSampler",
    "build_dino_train_loader",
    "DinoTrainer",
]
