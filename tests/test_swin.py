"""The Swin Transformer backbone: configs (Swin-L parameter count of the official model), any input
size, the shifted-window mask, activation checkpointing, freezing, and a few training iterations of
DINO with a tiny Swin."""

import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng

from dino_detr import get_dino_cfg
from dino_detr.engine import DinoTrainer
from dino_detr.modeling.swin import SwinTransformer, shifted_window_mask, window_partition

from train_utils import ci_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_STAGES = ["swin0", "swin1", "swin2", "swin3"]
# A Swin small enough for CI: widths 16..128, one or two blocks per stage, window 4.
TINY_SWIN = [
    "MODEL.SWIN.EMBED_DIM",
    16,
    "MODEL.SWIN.DEPTHS",
    [1, 2, 2, 1],
    "MODEL.SWIN.NUM_HEADS",
    [1, 2, 2, 4],
    "MODEL.SWIN.WINDOW_SIZE",
    4,
]


def cfg_of(name, opts=()):
    cfg = get_dino_cfg(os.path.join(REPO, "configs", name), opts)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def tiny_swin(**kw):
    torch.manual_seed(0)
    args = dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window=4, out_features=ALL_STAGES)
    return SwinTransformer(**{**args, **kw})


def meta_model(name, opts=()):
    with torch.device("meta"):
        cfg = cfg_of(name, opts)
        cfg.MODEL.DEVICE = "meta"
        return build_model(cfg)


@pytest.mark.parametrize(
    "name, total, levels",
    [
        # IDEA-Research/DINO @ faa8520, config/DINO/DINO_4scale_swin.py (num_classes 91), built with random
        # weights: 217,230,066 parameters, 195,200,820 of them in the Swin-L backbone; 5-scale
        # (return_interm_indices [0, 1, 2, 3], num_feature_levels 5): 217,576,690 / 195,201,204.
        ("dino_swinl_4scale.yaml", 217_230_066, 4),
        ("dino_swinl_5scale.yaml", 217_576_690, 5),
    ],
)
def test_swinl_configs_match_official_parameter_count(name, total, levels):
    model = meta_model(name, ["MODEL.DINO.NUM_CLASSES", 91])
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.backbone.parameters()) == (195_200_820 if levels == 4 else 195_201_204)
    assert len(model.input_proj) == levels
    shapes = model.backbone.output_shape()
    assert [shapes[f].channels for f in ALL_STAGES[5 - levels :]] == [192, 384, 768, 1536][5 - levels :]
    assert all(b.attn.window == 12 for stage in model.backbone.layers for b in stage.blocks)


def test_swint_config_builds():
    model = meta_model("dino_swint_4scale.yaml")
    shapes = model.backbone.output_shape()
    assert [(shapes[f].channels, shapes[f].stride) for f in ALL_STAGES[1:]] == [(192, 8), (384, 16), (768, 32)]
    assert (
        sum(p.numel() for p in model.backbone.parameters()) == 27_520_506
    )  # official swin_T_224_1k with out_indices (1, 2, 3)


@pytest.mark.parametrize("size", [(64, 64), (37, 61), (130, 97)])
def test_any_input_size(size):
    model = tiny_swin().eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = model(x)
    for f, spec in model.output_shape().items():
        stride = spec.stride
        assert out[f].shape == (2, spec.channels, -(-size[0] // stride), -(-size[1] // stride)), f
    # each image of a batch is computed on its own
    with torch.no_grad():
        single = model(x[1:])
    for f in out:
        torch.testing.assert_close(out[f][1:], single[f], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side, window", [(8, 4), (12, 4), (14, 7), (4, 4)])
def test_shifted_window_mask_separates_non_neighbours(side, window):
    """Two tokens of a shifted window may attend to each other exactly when the cyclic shift did not
    wrap around between them: their offset in the shifted map is their offset in the image."""
    shift = window // 2
    mask = shifted_window_mask(side, side, window, shift)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    rolled = torch.stack([ys, xs], dim=-1)
    orig = (rolled + shift) % side  # image coordinates of the tokens after torch.roll(-shift)
    rolled, orig = (window_partition(t[None].float(), window).long() for t in (rolled, orig))  # (nW, T, 2)
    offset = lambda t: t[:, :, None] - t[:, None, :]  # noqa: E731
    near = (offset(orig) == offset(rolled)).all(-1)
    assert mask.shape == near.shape
    assert torch.equal(mask == 0, near)
    assert set(mask.unique().tolist()) <= {0.0, -100.0}


def test_activation_checkpointing_same_gradients():
    x = torch.randn(1, 3, 45, 52)
    grads = []
    for use_checkpoint in (False, True):
        model = tiny_swin(use_checkpoint=use_checkpoint, drop_path_rate=0.0).train()
        sum((f.square()).mean() for f in model(x).values()).backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    assert all(g is not None for g in grads[0].values())  # every stage gets a gradient
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize(
    "freeze_at, frozen_prefixes",
    [
        (0, ()),
        (1, ("patch_embed.",)),
        (3, ("patch_embed.", "layers.0.", "layers.1.", "norm0.", "norm1.")),
    ],
)
def test_freeze_at(freeze_at, frozen_prefixes):
    model = tiny_swin(freeze_at=freeze_at).train()
    for name, p in model.named_parameters():
        assert p.requires_grad != name.startswith(frozen_prefixes), name
    frozen_stages = max(freeze_at - 1, 0)
    assert [stage.training for stage in model.layers] == [False] * frozen_stages + [True] * (4 - frozen_stages)


@pytest.mark.parametrize(
    "opts, key",
    [
        (["MODEL.SWIN.DEPTHS", [2, 2, 6]], "MODEL.SWIN.DEPTHS"),
        (["MODEL.SWIN.OUT_FEATURES", ["swin1", "res4"]], "MODEL.SWIN.OUT_FEATURES"),
        (["MODEL.SWIN.NUM_HEADS", [5, 6, 12, 24]], "MODEL.SWIN"),
        (["MODEL.BACKBONE.FREEZE_AT", 6], "MODEL.BACKBONE.FREEZE_AT"),
    ],
)
def test_bad_swin_config_names_the_key(opts, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_model(cfg_of("dino_swint_4scale.yaml", TINY_SWIN + opts))


def test_bad_input_names_the_shape():
    with pytest.raises(ValueError, match=r"\(2, 1, 32, 32\)"):
        tiny_swin()(torch.zeros(2, 1, 32, 32))


@pytest.mark.parametrize("name", ["dino_swinl_4scale.yaml", "dino_swinl_5scale.yaml"])
def test_swin_config_trains_a_few_iterations(name, tmp_path):
    """The Swin-L config with a tiny Swin (activation checkpointing on, as configured) runs DinoTrainer
    for 3 iterations: finite losses, and the backbone's weights move."""
    dataset = ci_dataset(tmp_path / "shapes")
    cfg = cfg_of(
        name,
        TINY_SWIN
        + [
            "MODEL.DINO.HIDDEN_DIM",
            64,
            "MODEL.DINO.NHEADS",
            4,
            "MODEL.DINO.ENC_LAYERS",
            1,
            "MODEL.DINO.DEC_LAYERS",
            2,
            "MODEL.DINO.DIM_FEEDFORWARD",
            128,
            "MODEL.DINO.NUM_QUERIES",
            30,
            "MODEL.DINO.NUM_SELECT",
            30,
            "MODEL.DINO.DN_NUMBER",
            10,
            "MODEL.DINO.NUM_CLASSES",
            4,
            "DATASETS.TRAIN",
            (dataset,),
            "DATASETS.TEST",
            (),
            "INPUT.MIN_SIZE_TRAIN",
            (96,),
            "INPUT.MAX_SIZE_TRAIN",
            128,
            "INPUT.DETR_CROP.ENABLED",
            False,
            "SOLVER.IMS_PER_BATCH",
            2,
            "SOLVER.MAX_ITER",
            3,
            "SOLVER.STEPS",
            (),
            "SOLVER.CHECKPOINT_PERIOD",
            100,
            "SOLVER.BACKBONE_MULTIPLIER",
            1.0,
            "TEST.EVAL_PERIOD",
            0,
            "DATALOADER.NUM_WORKERS",
            0,
            "OUTPUT_DIR",
            str(tmp_path / "out"),
            "SEED",
            0,
        ],
    )
    assert cfg.MODEL.SWIN.USE_CHECKPOINT
    seed_all_rng(0)
    trainer = DinoTrainer(cfg)
    trainer.resume_or_load(resume=False)
    before = {k: v.detach().clone() for k, v in trainer.model.backbone.state_dict().items()}
    trainer.train()
    losses = trainer.storage.history("total_loss").values()
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(v)) for v, _ in losses)
    after = trainer.model.backbone.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert set(k.split(".")[0] for k in moved) >= {"patch_embed", "layers"}
    assert any(k.startswith("layers.3.") for k in moved)


def test_window_attention_flops_are_counted():
    """fvcore counts the attention products (scaled_dot_product_attention) of the windows, not only the
    linear layers: 2 * windows * heads * T^2 * head_dim on top of qkv and proj."""
    from fvcore.nn import FlopCountAnalysis

    from dino_detr.analysis.flops import sdpa_flop_jit
    from dino_detr.modeling.swin import WindowAttention

    dim, heads, window, windows = 32, 4, 4, 6
    tokens = window * window
    attn = WindowAttention(dim, heads, window).eval()
    x = torch.randn(windows, tokens, dim)
    for mask in (None, shifted_window_mask(8, 12, window, 2)):
        analysis = FlopCountAnalysis(attn, (x, mask)).unsupported_ops_warnings(False)
        analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
        by_op = analysis.by_operator()
        assert by_op["linear"] == windows * tokens * dim * 4 * dim
        assert by_op["scaled_dot_product_attention"] == 2 * windows * tokens * tokens * dim


@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_equals_explicit_softmax(shifted):
    """softmax(q k^T / sqrt(d) + relative position bias + shift mask) v, written out per head."""
    from dino_detr.modeling.swin import WindowAttention, relative_position_index

    torch.manual_seed(0)
    dim, heads, window = 12, 3, 4
    attn = WindowAttention(dim, heads, window).double().eval()
    mask = shifted_window_mask(8, 8, window, 2).double() if shifted else None
    x = torch.randn(2 * 4, window * window, dim, dtype=torch.float64)  # 2 images of 2x2 windows
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    index = relative_position_index(window)
    heads_out = []
    for h in range(heads):
        sl = slice(h * dim // heads, (h + 1) * dim // heads)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) / (dim // heads) ** 0.5
        logits = logits + attn.relative_position_bias_table[index, h]
        if mask is not None:
            logits = logits + mask.repeat(2, 1, 1)
        heads_out.append(logits.softmax(-1) @ v[..., sl])
    expected = attn.proj(torch.cat(heads_out, dim=-1))
    torch.testing.assert_close(attn(x, mask), expected, rtol=1e-12, atol=1e-12)
