"""Where Detectron2 v0.6 (the last release, what CI installs) and upstream main (what users build
from the repository, last tested at commit 02b5c4e2) behave differently, in one place.

The rest of the project uses only API that both have. What differs, and what is done about it:

* **Training-loop state in checkpoints.** v0.6's ``DefaultTrainer`` checkpoints neither the
  optimizer nor the AMP grad scaler; main stores its inner loop's state (``"_trainer"``) itself.
  :data:`TRAINER_CHECKPOINTS_LOOP_STATE` tells ``DinoTrainer`` whether to add it.
* **When the data loader's iterator is created.** v0.6's ``SimpleTrainer`` calls
  ``iter(data_loader)`` when it is built; main creates it on the first ``run_step``. Creating a
  PyTorch ``DataLoader`` iterator draws the loader's base seed from the global torch RNG, so on
  main that draw falls inside the first iteration of every run, after ``IterationSeedHook`` has
  seeded it: the first iteration after ``--resume`` then gets other denoising noise than the
  same iteration of an uninterrupted run, and the two runs diverge. :func:`start_data_loader`
  creates the iterator before training on both, which is what v0.6 always did: every random
  draw of iteration ``i`` is then a function of (``SEED``, ``i``, rank) alone, on both versions.
* **Loading again after a failed load.** Main's ``DetectionCheckpointer.load`` keeps the parsed
  path (``_parsed_url_during_load``, for ``?matching_heuristics=True`` queries) while it loads,
  asserts on entry that none is kept and clears it only when the load returns: after a load that
  raised (an unreadable, torn checkpoint), every later load of that checkpointer fails with a
  bare ``AssertionError``. v0.6 keeps no such state. :func:`forget_failed_load` clears it as
  main's own ``load`` does on success (nothing to do on v0.6), so ``SafeCheckpointer`` can fall
  back to an older checkpoint on both.
* **Detectron2's compiled ops.** Built from source (upstream main, or v0.6 from its repository),
  ``detectron2._C`` holds the C++ ops, among them the fast COCO evaluator; CI's offline v0.6 has
  a placeholder ``_C`` (``tools/install_detectron2.py``) whose ops raise. :func:`has_fast_coco_eval`
  detects which, so ``COCOEvaluator`` uses the fast evaluator wherever it exists.
"""

from detectron2.engine import DefaultTrainer

__all__ = ["TRAINER_CHECKPOINTS_LOOP_STATE", "start_data_loader", "forget_failed_load", "has_fast_coco_eval"]

TRAINER_CHECKPOINTS_LOOP_STATE = "state_dict" in vars(DefaultTrainer)


def start_data_loader(loop, data_loader=None) -> None:
    """Make the training loop ``loop`` (``SimpleTrainer`` or a subclass) read from ``data_loader``
    (default: the one it has), with the loader's iterator created now rather than on first use."""
    if data_loader is not None:
        loop.data_loader = data_loader
    if "_data_loader_iter_obj" in vars(loop):  # main: created lazily by the `_data_loader_iter` property
        loop._data_loader_iter_obj = iter(loop.data_loader)
    elif data_loader is not None:  # v0.6: a plain attribute, created with the loop
        loop._data_loader_iter = iter(data_loader)


def forget_failed_load(checkpointer) -> None:
    """Lets ``checkpointer`` (a ``DetectionCheckpointer``) load again after a ``load`` that raised."""
    if getattr(checkpointer, "_parsed_url_during_load", None) is not None:
        checkpointer._parsed_url_during_load = None


def has_fast_coco_eval() -> bool:
    """True when ``detectron2._C`` is Detectron2's compiled extension with the fast COCO evaluator
    (``COCOEvaluator(use_fast_impl=True)``); False for the placeholder or no ``_C`` at all."""
    try:
        from detectron2 import _C

        return callable(_C.COCOevalAccumulate) and callable(_C.COCOevalEvaluateImages)
    except Exception:  # ImportError, or the placeholder's error naming the missing op
        return False
