"""Per-iteration reseeding: makes every random draw of iteration i (augmentation with
``DATALOADER.NUM_WORKERS: 0``, denoising noise, dropout) a function of (SEED, i, rank), so
a resumed run continues exactly like an uninterrupted one."""

from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

__all__ = ["IterationSeedHook", "iteration_seed"]


def iteration_seed(seed: int, iteration: int, rank: int) -> int:
    """A distinct 31-bit seed per (seed, iteration, rank)."""
    return (seed * 1_000_003 + iteration * 1_009 + rank) % (2**31)


class IterationSeedHook(HookBase):
    """Seeds ``random``, NumPy and torch before every step from (``seed``, iteration, rank)."""

    def __init__(self, seed: int):
        self.seed = seed

    def before_step(self):
        seed_all_rng(iteration_seed(self.seed, self.trainer.iter, comm.get_rank()))
