"""The trainer's state on the CI dataset (CPU): resuming equals an uninterrupted run, a NaN loss stops training
and keeps the last checkpoint, two-process gradients equal one process's, the EMA is checkpointed and evaluated."""

import math
import os
import socket

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

from dino_detr.engine import DinoTrainer

from train_utils import ci_cfg

pytestmark = pytest.mark.usefixtures("at_most_two_threads")


class _Interrupt(Exception):
    pass


class _StopAfter(HookBase):
    def __init__(self, iteration):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            raise _Interrupt(f"stopped after iteration {self.iteration}")


def _final_state(trainer):
    return trainer.model.state_dict(), trainer.optimizer.state_dict()


def test_resume_equals_uninterrupted_run(dataset, tmp_path, one_thread):
    steps = 3
    overrides = {
        "SOLVER.CHECKPOINT_PERIOD": steps,
        "SOLVER.IMS_PER_BATCH": 2,
        "SOLVER.WARMUP_ITERS": 2,
        "DATASETS.TEST": (),
    }
    cfg = ci_cfg(tmp_path / "resumed", 2 * steps, **overrides)
    seed_all_rng(cfg.SEED)  # what default_setup does
    first = DinoTrainer(cfg)
    first.register_hooks([_StopAfter(steps - 1)])
    first.resume_or_load(resume=False)
    with pytest.raises(_Interrupt):
        first.train()
    assert os.path.exists(os.path.join(cfg.OUTPUT_DIR, f"model_{steps - 1:07d}.pth"))
    resumed = DinoTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == steps
    resumed.train()

    seed_all_rng(cfg.SEED)
    straight = DinoTrainer(ci_cfg(tmp_path / "straight", 2 * steps, **overrides))
    straight.resume_or_load(resume=False)
    straight.train()

    (weights_a, optim_a), (weights_b, optim_b) = _final_state(resumed), _final_state(straight)
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
    assert len(optim_a["state"]) == len(optim_b["state"]) > 0
    for index, state in optim_a["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(optim_b["state"][index][name])), (index, name)
    # and training actually changed the weights
    initial = DinoTrainer.build_model(cfg).state_dict()
    assert any(not torch.equal(initial[k], weights_a[k]) for k in weights_a)


class _PoisonLoss(HookBase):
    """Makes the losses of one iteration NaN (as an overflowing loss would)."""

    def __init__(self, iteration):
        self.iteration = iteration

    def before_train(self):
        def poison(module, inputs, losses):
            if self.trainer.iter == self.iteration:
                return {k: v * float("nan") for k, v in losses.items()}
            return None

        self.trainer.model.criterion.register_forward_hook(poison)


def test_nan_loss_stops_training_and_keeps_last_checkpoint(dataset, tmp_path):
    cfg = ci_cfg(tmp_path, 8, **{"SOLVER.CHECKPOINT_PERIOD": 2, "SOLVER.IMS_PER_BATCH": 2, "DATASETS.TEST": ()})
    trainer = DinoTrainer(cfg)
    trainer.register_hooks([_PoisonLoss(iteration=4)])
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError, match="NaN") as error:
        trainer.train()
    assert "iteration" in str(error.value)
    with open(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")) as f:
        assert f.read().strip() == "model_0000003.pth"
    assert not os.path.exists(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values() if v.is_floating_point())
    saved = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_0000003.pth"), map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    model = DinoTrainer.build_model(cfg)
    DetectionCheckpointer(model).load(os.path.join(cfg.OUTPUT_DIR, "model_0000003.pth"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fixed_size_batch(cfg, count: int, size: int = 128):
    """``count`` demo images resized to size x size (equal sizes: no padding differences)."""
    from detectron2.data import detection_utils as utils
    from detectron2.data import transforms as T

    records = [r for r in DatasetCatalog.get(cfg.DATASETS.TRAIN[0]) if len(r["annotations"]) == 2][:count]
    assert len(records) == count
    batch = []
    for record in records:
        image = utils.read_image(record["file_name"], "RGB")
        transform = T.ResizeTransform(image.shape[0], image.shape[1], size, size)
        annos = [
            utils.transform_instance_annotations(a, T.TransformList([transform]), (size, size))
            for a in record["annotations"]
        ]
        batch.append(
            {
                "image": torch.as_tensor(np.ascontiguousarray(transform.apply_image(image).transpose(2, 0, 1))),
                "instances": utils.annotations_to_instances(annos, (size, size)),
            }
        )
    return batch


def _ddp_worker(rank, world_size, port, cfg, batch, out_file):
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        torch.manual_seed(0)
        model = DinoTrainer.build_model(cfg)
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        shard = batch[rank * len(batch) // world_size : (rank + 1) * len(batch) // world_size]
        sum(ddp(shard).values()).backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out_file)
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gradients_equal_single_process(dataset, tmp_path):
    # Deterministic denoising (no noise) and FrozenBN: every term then depends only on the
    # global batch, so averaged DDP gradients must equal the single-process ones.
    cfg = ci_cfg(
        tmp_path,
        1,
        **{
            "MODEL.RESNETS.NORM": "FrozenBN",
            "MODEL.DINO.DN_BOX_NOISE_SCALE": 0.0,
            "MODEL.DINO.DN_LABEL_NOISE_RATIO": 0.0,
        },
    )
    batch = _fixed_size_batch(cfg, 4)
    torch.manual_seed(0)
    model = DinoTrainer.build_model(cfg)
    sum(model(batch).values()).backward()
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    out_file = str(tmp_path / "ddp_grads.pt")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), cfg, batch, out_file), nprocs=2)
    ddp = torch.load(out_file, weights_only=False)
    assert single.keys() == ddp.keys()
    worst = max((single[n] - ddp[n]).abs().max().item() / (single[n].abs().max().item() + 1e-12) for n in single)
    assert worst < 1e-3, f"largest relative gradient difference {worst}"
    assert not math.isclose(sum(g.abs().sum().item() for g in single.values()), 0.0)


def test_ema_is_checkpointed_and_used_for_evaluation(dataset, tmp_path):
    cfg = ci_cfg(
        tmp_path,
        2,
        **{"MODEL_EMA.ENABLED": True, "MODEL_EMA.DECAY": 0.5, "DATASETS.TEST": (), "SOLVER.IMS_PER_BATCH": 2},
    )
    trainer = DinoTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    saved = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), map_location="cpu", weights_only=False)
    key = "transformer.tgt_embed.weight"
    assert torch.equal(saved["model_ema"][key], trainer.ema.state_dict()[key])
    assert not torch.equal(saved["model_ema"][key], saved["model"][key])
    seen = {}

    def record_test(cfg, model):
        seen["weight"] = model.state_dict()[key].clone()
        return {}

    trainer.test = record_test
    trainer.evaluate()
    assert torch.equal(seen["weight"], saved["model_ema"][key])
    assert torch.equal(trainer.model.state_dict()[key], saved["model"][key])  # own weights restored
