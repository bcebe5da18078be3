"""Mixed-precision training (SOLVER.AMP) on the CPU: bfloat16 autocast without a grad scaler,
float16 with a checkpointed, resumable scaler, and the precision key's validation."""

import math
import os

import pytest
import torch
from detectron2.engine import HookBase
from torch import nn

import dino_detr.data  # noqa: F401
from dino_detr.engine import DinoTrainer, MixedPrecisionTrainer, amp_precision

from train_utils import ci_cfg

pytestmark = pytest.mark.usefixtures("at_most_two_threads")


class _Record(HookBase):
    """Records the dtypes of every ``nn.Linear`` output and the total loss of each iteration."""

    def __init__(self):
        self.dtypes, self.losses = set(), []

    def before_train(self):
        for module in self.trainer.model.modules():
            if isinstance(module, nn.Linear):
                module.register_forward_hook(lambda m, i, out: self.dtypes.add(out.dtype))

    def after_step(self):
        self.losses.append(self.trainer.storage.history("total_loss").latest())


def _train(cfg):
    trainer = DinoTrainer(cfg)
    record = _Record()
    trainer.register_hooks([record])
    trainer.resume_or_load(resume=False)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    changed = any(not torch.equal(initial[k], v) for k, v in trainer.model.state_dict().items())
    return trainer, record, changed


def _amp_cfg(output_dir, precision, iterations, **overrides):
    return ci_cfg(
        output_dir,
        iterations,
        **{
            "SOLVER.AMP.ENABLED": True,
            "SOLVER.AMP.PRECISION": precision,
            "SOLVER.IMS_PER_BATCH": 2,
            "DATASETS.TEST": (),
            **overrides,
        },
    )


def test_bfloat16_training_runs_under_autocast_without_a_scaler(dataset, tmp_path):
    trainer, record, changed = _train(_amp_cfg(tmp_path, "bfloat16", 3))
    assert isinstance(trainer._trainer, MixedPrecisionTrainer) and trainer._trainer.grad_scaler is None
    assert torch.bfloat16 in record.dtypes  # the linear layers really ran in bfloat16
    assert len(record.losses) == 3 and all(math.isfinite(loss) for loss in record.losses)
    assert changed
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay float32
    assert "grad_scaler" not in trainer.state_dict()["_trainer"]


def test_float16_training_keeps_a_checkpointed_resumable_scaler(dataset, tmp_path):
    # float16 convolutions are slow on the CPU: one small image per step
    cfg = _amp_cfg(
        tmp_path,
        "float16",
        2,
        **{
            "SOLVER.CHECKPOINT_PERIOD": 2,
            "SOLVER.IMS_PER_BATCH": 1,
            "INPUT.MIN_SIZE_TRAIN": (64,),
            "INPUT.MAX_SIZE_TRAIN": 96,
        },
    )
    trainer, record, _ = _train(cfg)
    assert torch.float16 in record.dtypes
    scaler = trainer._trainer.grad_scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    path = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    saved = torch.load(path, weights_only=False)
    assert saved["trainer"]["_trainer"]["grad_scaler"]["scale"] == scaler.get_scale()
    saved["trainer"]["_trainer"]["grad_scaler"]["scale"] = 1024.0  # unlike a fresh scaler's
    torch.save(saved, path)
    resumed = DinoTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    assert resumed._trainer.grad_scaler.get_scale() == 1024.0


def test_amp_precision_is_validated_before_the_model_is_built(tmp_path):
    cfg = ci_cfg(tmp_path, 1, **{"SOLVER.AMP.PRECISION": "float8"})
    with pytest.raises(ValueError, match=r"SOLVER.AMP.PRECISION must be one of 'float16', 'bfloat16', got 'float8'"):
        DinoTrainer(cfg)


def test_bfloat16_is_refused_on_a_gpu_without_it(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla T4")
    cfg = _amp_cfg(tmp_path, "bfloat16", 1, **{"MODEL.DEVICE": "cuda"})
    with pytest.raises(ValueError, match=r"'bfloat16' needs a GPU of compute capability 8.0 or newer; Tesla T4 is 7.5"):
        amp_precision(cfg)
    cfg.SOLVER.AMP.PRECISION = "float16"
    assert amp_precision(cfg) == torch.float16
