"""Training data loader that can start in the middle of its sample stream, so a resumed
run sees the batches an uninterrupted run would have seen."""

import itertools

from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm

from dino_detr.data import DinoDatasetMapper, check_num_classes

__all__ = ["ResumableTrainingSampler", "build_dino_train_loader"]


class ResumableTrainingSampler(TrainingSampler):
    """Detectron2's infinite ``TrainingSampler`` that skips its first ``skip`` indices (of
    this worker's stream)."""

    def __init__(self, size: int, shuffle: bool = True, seed=None, skip: int = 0):
        super().__init__(size, shuffle=shuffle, seed=seed)
        self._skip = skip

    def __iter__(self):
        yield from itertools.islice(super().__iter__(), self._skip, None)


def build_dino_train_loader(cfg, start_iter: int = 0):
    """Batches of :class:`DinoDatasetMapper` training inputs from ``DATASETS.TRAIN``, starting
    at iteration ``start_iter`` of the stream. The sampler is seeded with ``SEED`` when it is
    >= 0. The resumed stream is exact without ``DATALOADER.ASPECT_RATIO_GROUPING`` (grouping
    reorders samples into batches). ``MODEL.DINO.NUM_CLASSES`` must equal the number of
    categories of the training datasets."""
    dataset = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    check_num_classes(cfg.MODEL.DINO.NUM_CLASSES, cfg.DATASETS.TRAIN)
    per_worker_batch = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
    sampler = ResumableTrainingSampler(
        len(dataset), seed=cfg.SEED if cfg.SEED >= 0 else None, skip=start_iter * per_worker_batch
    )
    return build_detection_train_loader(
        cfg, mapper=DinoDatasetMapper(cfg, is_train=True), dataset=dataset, sampler=sampler
    )
