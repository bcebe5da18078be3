"""dino_detr.compat: what differs between Detectron2 v0.6 and upstream main, checked on whichever is
installed, with the other version's behaviour reproduced where it is not (``make test-d2-main``
runs this file against upstream main itself)."""

import os
import sys
import types

import detectron2
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import SimpleTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances
from torch import nn

from dino_detr.checkpoint import SafeCheckpointer, UnreadableCheckpointError
from dino_detr.compat import forget_failed_load, has_fast_coco_eval, start_data_loader
from dino_detr.engine import DinoTrainer

from train_utils import ci_cfg, ci_dataset


class _Numbers(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from range(1000)


class _MainStyleLoop:
    """The data-loader handling of Detectron2 main's ``SimpleTrainer``: iterator created on first use."""

    def __init__(self, data_loader):
        self.data_loader = data_loader
        self._data_loader_iter_obj = None

    @property
    def _data_loader_iter(self):
        if self._data_loader_iter_obj is None:
            self._data_loader_iter_obj = iter(self.data_loader)
        return self._data_loader_iter_obj


def _draws_during_first_batch(loop) -> bool:
    """Whether reading the loop's first batch takes a number from the global torch RNG (as creating
    a DataLoader iterator does: its base seed)."""
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    next(loop._data_loader_iter)
    return not torch.equal(torch.rand(1), expected)


def _loader():
    return torch.utils.data.DataLoader(_Numbers(), batch_size=2)


@pytest.mark.parametrize("kind", ["installed", "main"])
def test_data_loader_iterator_is_created_before_training(kind):
    """After start_data_loader the first training step draws no random number (resume exactness)."""

    def make():
        if kind == "main":
            return _MainStyleLoop(_loader())
        return SimpleTrainer(nn.Linear(1, 1), _loader(), torch.optim.SGD(nn.Linear(1, 1).parameters(), 0.1))

    if kind == "main":
        assert _draws_during_first_batch(make())  # the problem this solves: main draws in the step
    loop = make()
    start_data_loader(loop)
    assert not _draws_during_first_batch(loop)
    loop = make()
    start_data_loader(loop, torch.utils.data.DataLoader(_Numbers(), batch_size=3))
    assert not _draws_during_first_batch(loop) and len(next(loop._data_loader_iter)) == 3


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(2, 2)


class _MainStyleCheckpointer(SafeCheckpointer):
    """Detectron2 main's ``DetectionCheckpointer.load`` state: set during a load, cleared only on success."""

    _parsed_url_during_load = None

    def load(self, path, *args, **kwargs):
        assert self._parsed_url_during_load is None
        self._parsed_url_during_load = path
        result = super().load(path, *args, **kwargs)
        self._parsed_url_during_load = None
        return result


# Where the installed Detectron2 is main, SafeCheckpointer itself has main's load.
MAIN_STYLE_LOAD = "_parsed_url_during_load" in vars(SafeCheckpointer(nn.Linear(1, 1)))


@pytest.mark.parametrize(
    "checkpointer_type", [SafeCheckpointer] + ([] if MAIN_STYLE_LOAD else [_MainStyleCheckpointer])
)
def test_resume_falls_back_after_a_failed_load(tmp_path, checkpointer_type):
    model = _Toy()
    saver = SafeCheckpointer(model, str(tmp_path))
    saver.save("model_0000001", iteration=1)
    saver.save("model_0000002", iteration=2)
    os.utime(tmp_path / "model_0000001.pth", (1e9, 1e9))
    torn = tmp_path / "model_0000002.pth"
    torn.write_bytes(torn.read_bytes()[:100])  # power loss while writing
    loader = checkpointer_type(_Toy(), str(tmp_path))
    assert loader.resume_or_load("", resume=True)["iteration"] == 1
    with pytest.raises(UnreadableCheckpointError):
        loader.load(str(tmp_path / "model_0000002.pth"))
    forget_failed_load(loader)
    assert loader.load(str(tmp_path / "model_0000001.pth"))["iteration"] == 1


def _placeholder_c():
    module = types.ModuleType("detectron2._C")

    def missing(name):
        raise RuntimeError(f"detectron2._C.{name} is one of Detectron2's C++ ops")

    module.__getattr__ = missing
    return module


def _compiled_c():
    module = types.ModuleType("detectron2._C")
    module.COCOevalAccumulate = module.COCOevalEvaluateImages = lambda *a: None
    return module


@pytest.mark.parametrize("fake, fast", [(_placeholder_c, False), (_compiled_c, True), (None, False)])
def test_fast_coco_eval_is_detected(monkeypatch, tmp_path, fake, fast):
    """The trainer's COCOEvaluator is the fast one exactly when Detectron2's compiled ops are there."""
    module = fake() if fake else None  # None: no detectron2._C at all
    monkeypatch.setitem(sys.modules, "detectron2._C", module)
    monkeypatch.setattr(detectron2, "_C", module, raising=False)
    assert has_fast_coco_eval() is fast
    cfg = ci_cfg(tmp_path, 1)
    evaluator = DinoTrainer.build_evaluator(cfg, ci_dataset(tmp_path / "data"))
    assert evaluator._use_fast_impl is fast


def test_installed_detectron2_is_detected():
    """The real ``detectron2._C``: the compiled extension (upstream main built from source) or the
    placeholder of tools/install_detectron2.py (CI's v0.6)."""
    from detectron2 import _C

    compiled = getattr(_C, "__file__", "").endswith((".so", ".pyd"))
    assert has_fast_coco_eval() is compiled


@pytest.mark.skipif(not has_fast_coco_eval(), reason="Detectron2's compiled ops are not installed (CI's v0.6)")
def test_fast_coco_eval_agrees_with_pycocotools(tmp_path):
    name = ci_dataset(tmp_path / "data")
    records = DatasetCatalog.get(name)
    generator = torch.Generator().manual_seed(0)
    results = []
    for fast in (False, True):
        evaluator = COCOEvaluator(name, output_dir=str(tmp_path / str(fast)), use_fast_impl=fast)
        evaluator.reset()
        generator.manual_seed(0)
        for record in records:
            boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in record["annotations"]]
            boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            inst = Instances((record["height"], record["width"]))
            inst.pred_boxes = Boxes(boxes + 8 * torch.randn(boxes.shape, generator=generator))
            inst.scores = torch.rand(len(boxes), generator=generator)
            inst.pred_classes = torch.tensor([a["category_id"] for a in record["annotations"]], dtype=torch.long)
            evaluator.process([{"image_id": record["image_id"]}], [{"instances": inst}])
        results.append(evaluator.evaluate()["bbox"])
    assert 0 < results[0]["AP"] < 100
    assert results[1] == pytest.approx(results[0], abs=1e-6, nan_ok=True)  # APl: no large objects
