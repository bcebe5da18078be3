"""Optimizer builder, NaN guards and EMA of dino_detr.engine (no training loop)."""

import pytest
import torch
from detectron2.config import get_cfg
from torch import nn

from dino_detr import add_dino_config
from dino_detr.engine import FiniteCheckpointer, ModelEMA, build_dino_optimizer


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        return self.head(self.backbone(x))


def _cfg(**solver):
    cfg = get_cfg()
    add_dino_config(cfg)
    cfg.SOLVER.BASE_LR = 1e-3
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.WEIGHT_DECAY = 1e-4
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.1
    for key, value in solver.items():
        cfg.SOLVER[key] = value
    return cfg


def test_adamw_groups_with_backbone_multiplier():
    model = _Toy()
    optimizer = build_dino_optimizer(_cfg(), model)
    assert isinstance(optimizer, torch.optim.AdamW)
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert all(lrs[id(p)] == pytest.approx(1e-4) for p in model.backbone.parameters())
    assert all(lrs[id(p)] == pytest.approx(1e-3) for p in model.head.parameters())
    assert all(g["weight_decay"] == 1e-4 for g in optimizer.param_groups)
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_dino_optimizer(_cfg(OPTIMIZER="LAMB"), model)


def test_adamw_is_fused_and_steps_as_the_reference_loop():
    """Without a float16 grad scaler AdamW runs fused; its steps (both groups, weight decay,
    clipping) equal torch's per-tensor AdamW on the same clipped gradients."""
    torch.manual_seed(0)
    model, reference = _Toy(), _Toy()
    reference.load_state_dict(model.state_dict())
    start = model.head.weight.detach().clone()
    optimizer = build_dino_optimizer(_cfg(), model)
    assert all(g["fused"] for g in optimizer.param_groups)
    loop = torch.optim.AdamW(
        [
            {"params": list(reference.head.parameters()), "lr": 1e-3},
            {"params": list(reference.backbone.parameters()), "lr": 1e-4},
        ],
        weight_decay=1e-4,
        foreach=False,
    )
    for _ in range(3):
        x = torch.randn(8, 3)
        for m, opt in ((model, optimizer), (reference, loop)):
            opt.zero_grad()
            (m(x) * 100).sum().backward()
        torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 0.1)
        optimizer.step(), loop.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    assert (model.head.weight - start).abs().min() > 1e-5  # every weight moved
    amp = _cfg()
    amp.SOLVER.AMP.ENABLED = True
    assert not any(g["fused"] for g in build_dino_optimizer(amp, model).param_groups)  # float16: GradScaler
    amp.SOLVER.AMP.PRECISION = "bfloat16"
    assert all(g["fused"] for g in build_dino_optimizer(amp, model).param_groups)


def test_full_model_clipping_bounds_the_total_norm():
    model = _Toy()
    optimizer = build_dino_optimizer(_cfg(), model)
    (model(torch.randn(8, 3)) * 1000).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    before = torch.cat([g.flatten() for g in grads]).norm()
    assert before > 0.1
    optimizer.step()
    after = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert after == pytest.approx(0.1, rel=1e-4)
    # one global factor, not per-parameter clipping
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(p.grad, g * (0.1 / before), rtol=1e-4, atol=1e-9)


def test_non_finite_gradient_stops_before_the_update():
    model = _Toy()
    optimizer = build_dino_optimizer(_cfg(), model)
    model(torch.randn(2, 3)).sum().backward()
    model.head.weight.grad[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="Non-finite gradient norm"):
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_checkpointer_refuses_non_finite_weights(tmp_path):
    model = _Toy()
    checkpointer = FiniteCheckpointer(model, str(tmp_path))
    checkpointer.save("good")
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    with pytest.raises(FloatingPointError, match="head.bias"):
        checkpointer.save("bad")
    assert (tmp_path / "good.pth").exists() and not (tmp_path / "bad.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text().strip() == "good.pth"


def test_ema_update_apply_and_state(tmp_path):
    model = _Toy()
    ema = ModelEMA(model, decay=0.9)
    start = model.head.weight.detach().clone()
    with torch.no_grad():
        model.head.weight.add_(1.0)
        model.steps.fill_(5)
    ema.update(model)
    assert torch.allclose(ema.state_dict()["head.weight"], start + 0.1)
    assert ema.state_dict()["steps"] == 5
    with ema.apply_to(model):
        assert torch.allclose(model.head.weight, start + 0.1)
    assert torch.allclose(model.head.weight, start + 1.0)
    # stored and restored by a checkpointer as "model_ema"
    checkpointer = FiniteCheckpointer(model, str(tmp_path))
    checkpointer.add_checkpointable("model_ema", ema)
    checkpointer.save("with_ema")
    other_model = _Toy()
    other = ModelEMA(other_model, decay=0.9)
    loader = FiniteCheckpointer(other_model, str(tmp_path))
    loader.add_checkpointable("model_ema", other)
    loader.load(str(tmp_path / "with_ema.pth"))
    assert torch.allclose(other.state_dict()["head.weight"], start + 0.1)
    with pytest.raises(ValueError, match="DECAY"):
        ModelEMA(model, decay=1.0)
