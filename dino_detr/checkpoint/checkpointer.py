"""``SafeCheckpointer``: Detectron2's ``DetectionCheckpointer`` that runs no code from weight
files, refuses weights that do not fit the model, writes checkpoints crash-safely and
resumes from the newest readable checkpoint."""

import os
from typing import Any, Dict

import detectron2.engine.defaults
from detectron2.checkpoint import DetectionCheckpointer

from dino_detr.compat import forget_failed_load

from .finetune import drop_mismatched_class_tensors, mismatched_class_tensors
from .fit import check_checkpoint_fits
from .io import SOURCE_GLOBALS, atomic_open, save_torch_file
from .layouts import as_project_checkpoint
from .safe_load import UnreadableCheckpointError, load_pickled_arrays, load_torch_weights

__all__ = ["SafeCheckpointer", "use_safe_checkpointer"]


def _as_detectron2_checkpoint(data: Any, path: str) -> Dict[str, Any]:
    """The checkpoint dict Detectron2 expects from a ``.pkl`` file's content: a Detectron2
    model-zoo dict as it is, otherwise Caffe2 / Detectron1 blobs for name matching."""
    if not isinstance(data, dict):
        raise UnreadableCheckpointError(f"{path}: holds a {type(data).__name__}, not a dict of arrays")
    if "model" in data and "__author__" in data:
        return data
    blobs = data.get("blobs", data)
    blobs = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
    return {"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}


class SafeCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with these differences:

    * Loading runs no code: ``.pkl`` files through an unpickler that allows only NumPy arrays
      and containers, anything else through ``torch.load(weights_only=True)``; a refused file
      raises an error naming it and the opt-in for trusted files (``DINO_DETR_TRUSTED_WEIGHTS``).
    * Checkpoints of the official DINO, detrex and mmdetection are recognised from their tensor
      names and converted in memory (:func:`as_project_checkpoint`); ``dino_detr://<name>``
      loads published weights by name (``dino_detr.checkpoint.zoo``).
    * Weights that do not fit (see :func:`check_checkpoint_fits`) raise ``ValueError`` instead
      of leaving the model randomly initialised with a warning.
    * A checkpoint of another number of classes: with ``reinit_class_tensors=True`` (fine-tuning)
      its class-dependent tensors are left out and logged (:func:`drop_mismatched_class_tensors`);
      otherwise (the default: evaluation, ``DefaultPredictor``) it is an error, since the model
      would predict with untrained class heads.
    * ``save`` writes through a temporary file (fsync + rename) and only then updates
      ``last_checkpoint`` (also atomically): a crash never leaves a truncated checkpoint named.
    * ``resume_or_load(resume=True)`` reports a checkpoint it cannot read and resumes from the
      newest readable one in ``save_dir``.
    """

    def __init__(self, model, save_dir: str = "", *, reinit_class_tensors: bool = False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.reinit_class_tensors = reinit_class_tensors

    def _load_file(self, filename: str) -> Dict[str, Any]:
        self._loading = filename
        if filename.endswith(".pkl"):
            return _as_detectron2_checkpoint(load_pickled_arrays(filename), filename)
        loaded = load_torch_weights(filename, SOURCE_GLOBALS)
        if not isinstance(loaded, dict):
            raise UnreadableCheckpointError(f"{filename}: holds a {type(loaded).__name__}, not a dict of tensors")
        return as_project_checkpoint(loaded, self.model, filename)

    def _load_model(self, checkpoint: Any):
        if not self.reinit_class_tensors:
            mismatched = mismatched_class_tensors(checkpoint["model"], self.model)
            if mismatched:
                rows = checkpoint["model"][mismatched[0]].shape[0]
                own = self.model.state_dict()[mismatched[0]].shape[0]
                raise ValueError(
                    f"checkpoint {getattr(self, '_loading', '?')} was trained for another number of classes "
                    f"({mismatched[0]} has {rows} rows, the model {own}: MODEL.DINO.NUM_CLASSES); evaluating it "
                    "would use untrained class heads. Fine-tune it first (tools/train_net.py without --eval-only)."
                )
        checkpoint["model"], _ = drop_mismatched_class_tensors(checkpoint["model"], self.model)
        incompatible = super()._load_model(checkpoint)
        check_checkpoint_fits(
            self.model.state_dict().keys(),
            [*incompatible.missing_keys, *(k for k, _, _ in incompatible.incorrect_shapes)],
            source=f"checkpoint {getattr(self, '_loading', '?')}",
            unexpected=incompatible.unexpected_keys,
        )
        return incompatible

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        save_torch_file(data, path)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        with atomic_open(os.path.join(self.save_dir, "last_checkpoint"), "w") as f:
            f.write(last_filename_basename)

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        tagged = self.get_checkpoint_file()
        others = sorted(
            (f for f in self.get_all_checkpoint_files() if os.path.abspath(f) != os.path.abspath(tagged)),
            key=os.path.getmtime,
            reverse=True,
        )
        tried = []
        for candidate in [tagged, *others]:
            try:
                if not os.path.isfile(candidate):
                    raise UnreadableCheckpointError(f"{candidate} does not exist")
                loaded = self.load(candidate)
            except UnreadableCheckpointError as e:
                forget_failed_load(self)
                self.logger.warning(f"Cannot resume from {candidate}: {e}")
                tried.append(os.path.basename(candidate))
                continue
            if tried:
                self.logger.warning(f"Resumed from {candidate}, the newest readable checkpoint (unreadable: {tried})")
            return loaded
        raise UnreadableCheckpointError(
            f"--resume: no readable checkpoint in {self.save_dir} (tried {tried}); remove 'last_checkpoint' "
            "there to start from MODEL.WEIGHTS instead"
        )


def use_safe_checkpointer() -> None:
    """Makes Detectron2's ``DefaultPredictor`` and ``DefaultTrainer`` build a
    :class:`SafeCheckpointer` (they create a ``DetectionCheckpointer`` themselves).

    Called when ``dino_detr`` is imported; only the name in ``detectron2.engine.defaults`` is
    rebound, ``DetectionCheckpointer`` itself is unchanged for all other code.
    """
    detectron2.engine.defaults.DetectionCheckpointer = SafeCheckpointer
