"""Where Detectron2 v0.6 and its newer versions (upstream main) behave differently, in one place.

The rest of the project uses only API that both have.
"""

from detectron2.engine import DefaultTrainer

__all__ = ["TRAINER_CHECKPOINTS_LOOP_STATE", "replace_data_loader"]

# v0.6's DefaultTrainer checkpoints neither the optimizer nor the AMP grad scaler; newer versions
# store the inner training loop's state themselves (as "_trainer").
TRAINER_CHECKPOINTS_LOOP_STATE = "state_dict" in vars(DefaultTrainer)


def replace_data_loader(loop, data_loader) -> None:
    """Make the training loop ``loop`` (``SimpleTrainer`` / ``AMPTrainer``) read from ``data_loader``.
    v0.6 creates the loader's iterator when the loop is built, newer versions on first use."""
    loop.data_loader = data_loader
    if "_data_loader_iter_obj" in vars(loop):
        loop._data_loader_iter_obj = None
    else:
        loop._data_loader_iter = iter(data_loader)
