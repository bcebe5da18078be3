"""The LazyConfig configs (configs/*.py) against the YAML ones, and tools/lazyconfig_train_net.py."""

import json

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.evaluation import COCOEvaluator
from detectron2.utils.env import seed_all_rng

from dino_detr import DinoDetr, get_dino_cfg
from dino_detr.compat import has_fast_coco_eval
from dino_detr.engine import add_full_model_clipping

import lazyconfig_train_net
from train_utils import REPO, ci_dataset

PAIRS = ["dino_r50_4scale", "dino_r50_5scale", "dino_swinl_4scale", "dino_demo"]


def yaml_model(name, seed=0, device="cpu"):
    """The model of configs/{name}.yaml, built after seeding with ``seed`` (on ``device``; "meta": no memory)."""
    cfg = get_dino_cfg(REPO / "configs" / f"{name}.yaml")
    seed_all_rng(seed)
    with torch.device(device):
        return DinoDetr(cfg)


def lazy_model(name, seed=0, device="cpu"):
    """The model of configs/{name}.py, built as :func:`yaml_model` builds its YAML twin."""
    cfg = LazyConfig.load(str(REPO / "configs" / f"{name}.py"))
    seed_all_rng(seed)
    with torch.device(device):
        return instantiate(cfg.model)


@pytest.mark.parametrize("name", PAIRS)
def test_lazy_config_builds_the_yaml_model(name):
    """Same parameter and buffer names, shapes, and the same modules shared (box heads)."""
    a, b = yaml_model(name, device="meta"), lazy_model(name, device="meta")
    shapes = {k: tuple(v.shape) for k, v in a.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in b.state_dict().items()}
    assert list(a.state_dict()) == list(b.state_dict())
    assert b.bbox_embed is b.transformer.decoder.bbox_embed
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())


@pytest.mark.parametrize("name", ["dino_demo", "dino_r50_4scale"])
def test_lazy_config_model_equals_yaml_model(name):
    """One seed gives the same weights; the same weights give the same detections and losses."""
    a, b = yaml_model(name), lazy_model(name)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    torch.manual_seed(1)
    image = torch.randint(0, 256, (3, 256, 320), dtype=torch.uint8)  # > 900 encoder tokens (R50)
    a.eval(), b.eval()
    with torch.no_grad():
        out_a, out_b = a([{"image": image}])[0]["instances"], b([{"image": image}])[0]["instances"]
    assert torch.equal(out_a.pred_boxes.tensor, out_b.pred_boxes.tensor)
    assert torch.equal(out_a.scores, out_b.scores) and torch.equal(out_a.pred_classes, out_b.pred_classes)


def test_lazy_config_model_differs_from_another_seed():
    """The check above can fail: another seed gives other weights."""
    a, b = yaml_model("dino_demo", seed=0), lazy_model("dino_demo", seed=1)
    assert not torch.equal(a.state_dict()["transformer.level_embed"], b.state_dict()["transformer.level_embed"])


def test_lazy_config_evaluator_uses_the_fast_coco_eval_when_detectron2_has_it():
    cfg = LazyConfig.load(str(REPO / "configs" / "dino_demo.py"))
    assert cfg.dataloader.evaluator._target_ is COCOEvaluator
    assert cfg.dataloader.evaluator.use_fast_impl == has_fast_coco_eval()


def test_full_model_clipping_of_an_instantiated_optimizer():
    """train.clip_grad: all gradients scaled together to max_norm; a non-finite norm stops before the step."""
    model = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = add_full_model_clipping(torch.optim.SGD(model.parameters(), lr=1.0), max_norm=0.1)
    assert isinstance(optimizer, torch.optim.SGD)
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # total L2 norm sqrt(8)
    optimizer.step()
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(b - p.detach(), torch.full_like(b, 0.1 / 8**0.5))
    model.weight.grad[0, 0] = float("nan")
    after = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="Non-finite gradient norm"):
        optimizer.step()
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), after))


def _run_tool(*args):
    return lazyconfig_train_net.main(lazyconfig_train_net.default_argument_parser().parse_args(list(args)))


def test_lazyconfig_tool_trains_and_evaluates_the_demo_config_with_detrex_overrides(tmp_path):
    """A detrex-style command line: a few iterations of the demo config on the CI data, evaluated at
    the end; then --eval-only with train.init_checkpoint (through SafeCheckpointer) gives the same AP."""
    name = ci_dataset(tmp_path / "data")
    out = tmp_path / "run"
    overrides = [
        f"dataloader.train.dataset.names={name}",
        f"dataloader.test.dataset.names={name}",
        "dataloader.train.mapper.augmentations.1.short_edge_length=[128]",
        "dataloader.test.mapper.augmentations.0.short_edge_length=128",
        "model.transformer.num_queries=30",
        "model.num_select=30",
    ]
    _run_tool(
        "--config-file",
        str(REPO / "configs" / "dino_demo.py"),
        f"train.output_dir={out}",
        "dataloader.train.total_batch_size=2",
        "train.max_iter=4",
        "train.eval_period=4",
        "train.checkpointer.period=4",
        "train.device=cpu",
        *overrides,
    )
    assert (out / "model_final.pth").is_file() and (out / "config.yaml").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert max(m["iteration"] for m in metrics if "total_loss" in m) == 3  # 4 iterations
    trained = [m for m in metrics if "bbox/AP" in m]
    assert len(trained) == 1 and 0 <= trained[0]["bbox/AP"] <= 100
    results = _run_tool(
        "--config-file",
        str(REPO / "configs" / "dino_demo.py"),
        "--eval-only",
        f"train.init_checkpoint={out / 'model_final.pth'}",
        f"train.output_dir={tmp_path / 'eval'}",
        "train.device=cpu",
        *overrides,
    )
    assert results["bbox"]["AP"] == pytest.approx(trained[0]["bbox/AP"])
