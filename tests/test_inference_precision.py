"""Inference precision (MODEL.DINO.INFERENCE_DTYPE): the CPU kernel's half-precision forward against the
reference, batch-norm folding, the choice of ``auto``, and a model converted once for bfloat16 inference
(its float32 islands, its outputs against float32, and what it refuses). The accuracy of a trained model in
bfloat16 (same top detections, COCO AP within 0.5) is tested in test_train.py on the trained demo model."""

import copy
import logging
import os
import threading
import time

import pytest
import torch
from detectron2.modeling import build_model

from dino_detr import get_dino_cfg
from dino_detr.layers import ms_deform_attn, ms_deform_attn_reference, native_extension_available
from dino_detr.modeling import inference_precision
from dino_detr.modeling.inference_precision import fold_batch_norms, native_bfloat16, resolve_inference_dtype

from msda_inputs import make_inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_ext = pytest.mark.skipif(not native_extension_available(), reason="dino_detr._C is not built")


def _bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance between two bfloat16 tensors in units of the last place of the larger magnitude."""
    a, b = a.float(), b.float()
    exponent = torch.floor(torch.log2(torch.maximum(a.abs(), b.abs()).clamp(min=2.0**-100)))
    return (a - b).abs() / torch.exp2(exponent - 7)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", [32, 7])  # a compiled-in channel count, and the generic loop
def test_cpu_half_value_forward_matches_reference(dtype, channels):
    """A float16 / bfloat16 value with float32 locations and weights (in and around the maps, borders,
    exact pixel centres): the CPU kernel returns value's dtype and equals the float32 reference on the same
    (rounded) values, rounded once: within one unit in the last place (float32 accumulation; summing in
    the half dtype would be off by several)."""
    value, shapes, starts, loc, weights = make_inputs(2, [[9, 13], [5, 7], [2, 3]], 4, channels, 50, 4, torch.float32)
    value = value.to(dtype)
    out = torch.ops.dino_detr.ms_deform_attn(value, shapes, starts, loc, weights)
    assert out.dtype == dtype and out.shape == (2, 50, 4 * channels)
    expected = ms_deform_attn_reference(value.float(), shapes, starts, loc, weights)
    if dtype == torch.bfloat16:
        assert _bf16_ulps(out, expected.to(dtype)).max() <= 1.0
    torch.testing.assert_close(out.float(), expected, rtol=2**-7 if dtype == torch.bfloat16 else 2**-10, atol=1e-5)
    # Half locations and weights are accepted too (widened to float32 by the kernel).
    same = torch.ops.dino_detr.ms_deform_attn(value, shapes, starts, loc.to(dtype).float(), weights.to(dtype).float())
    torch.testing.assert_close(
        torch.ops.dino_detr.ms_deform_attn(value, shapes, starts, loc.to(dtype), weights.to(dtype)), same
    )


@needs_ext
def test_cpu_half_value_has_no_backward_and_fake_kernel_accepts_it():
    """On the CPU a bfloat16 value is for inference: the backward refuses it naming the dtype; the fake
    kernel (torch.compile / export) accepts it and gives value's dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    value, shapes, starts, loc, weights = make_inputs(1, [[4, 5]], 2, 8, 6, 2, torch.float32)
    value = value.bfloat16().requires_grad_()
    out = ms_deform_attn(value, shapes, starts, loc, weights)
    with pytest.raises(TypeError, match="torch.bfloat16 value has no gradient on the CPU"):
        out.sum().backward()
    inputs = (value.detach(), shapes, starts, loc, weights)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in inputs]
        assert torch.ops.dino_detr.ms_deform_attn(*fake).dtype == torch.bfloat16


def test_msdeform_attn_module_passes_bfloat16_value_without_upcast(monkeypatch):
    """In inference (no gradient) a bfloat16 MSDeformAttn hands its bfloat16 value to the op as is, with
    float32 locations and weights; with gradients on the CPU the value is upcast (the backward is float32)."""
    from dino_detr.layers import MSDeformAttn, ms_deform_attn_module

    torch.manual_seed(0)
    module = MSDeformAttn(embed_dim=32, num_heads=2, num_levels=1, num_points=2).bfloat16()
    seen = []
    monkeypatch.setattr(ms_deform_attn_module, "ms_deform_attn", lambda *a: seen.append(a) or ms_deform_attn(*a))
    args = (torch.randn(1, 5, 32).bfloat16(), torch.rand(1, 5, 1, 2), torch.randn(1, 12, 32).bfloat16())
    shapes, starts = torch.tensor([[3, 4]]), torch.tensor([0])
    with torch.no_grad():
        assert module(*args, shapes, starts).dtype == torch.bfloat16
    module(*args, shapes, starts)
    assert [t.dtype for t in seen[0][:1] + seen[0][3:]] == [torch.bfloat16, torch.float32, torch.float32]
    assert seen[1][0].dtype == torch.float32


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
def test_fold_batch_norms_matches_unfolded(norm):
    """A ResNet with (frozen or eval-mode) batch norms gives the same features after folding, and has no
    norm left in its folded convolutions."""
    cfg = get_dino_cfg(
        os.path.join(REPO, "configs", "dino_demo.yaml"), ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", norm]
    )
    torch.manual_seed(0)
    backbone = build_model(cfg).backbone.eval()
    with torch.no_grad():
        for m in backbone.modules():  # non-trivial statistics
            if hasattr(m, "running_var"):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        x = torch.randn(1, 3, 96, 128)
        expected = backbone(x)
        folded = copy.deepcopy(backbone)
        assert fold_batch_norms(folded) == 15  # ResNet-18 up to res4: stem, 12 block convs, 2 shortcuts
        got = folded(x)
    assert not any(hasattr(m, "running_var") for m in folded.modules())
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4)


def test_auto_picks_bfloat16_only_with_native_support(monkeypatch, caplog):
    """``auto``: bfloat16 on a CPU with AMX or AVX512-BF16, float32 without; the choice is logged. Explicit
    names are taken as given, others refused."""
    for caps, expected in (
        ({"avx512_bf16": True}, torch.bfloat16),
        ({"amx_bf16": True, "amx_tile": True}, torch.bfloat16),
        ({"avx2": True, "avx512_f": True}, torch.float32),
    ):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        with caplog.at_level(logging.INFO, logger=inference_precision.__name__):
            caplog.clear()
            assert resolve_inference_dtype("auto", "cpu") == expected
        assert f"inference in {str(expected).removeprefix('torch.')}" in caplog.text
    assert resolve_inference_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="INFERENCE_DTYPE must be one of"):
        resolve_inference_dtype("bf16", "cpu")


def test_this_machine_reports_its_bfloat16_support():
    """What ``auto`` will do here agrees with torch's own CPU feature detection."""
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert bool(native_bfloat16("cpu")) == expected


def _demo_model(*opts):
    """The demo model with BatchNorm in its backbone (which inference folds into the convolutions)."""
    cfg = get_dino_cfg(
        os.path.join(REPO, "configs", "dino_demo.yaml"), ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN", *opts]
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for m in model.backbone.modules():  # eval-mode batch norms with statistics a trained model could have
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _image(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, 160, 224), generator=g, dtype=torch.uint8).float()}]


@needs_ext
def test_prepared_model_islands_and_features_close_to_float32():
    """``prepare_for_inference(bfloat16)``: class and box heads (and the input normalization) stay float32,
    everything else is bfloat16; the backbone features and the encoder memory stay within 2% (relative L2)
    of the float32 model's and the outputs are float32. (A random model ranks its queries by near-ties, so
    the detections themselves are compared on the trained demo model, in test_train.py.)"""
    reference = _demo_model()
    model = copy.deepcopy(reference).prepare_for_inference(torch.bfloat16)
    heads = [model.class_embed, model.bbox_embed, model.transformer.enc_out_class_embed]
    heads.append(model.transformer.enc_out_bbox_embed)
    kept = {id(p) for h in heads for p in h.parameters()}
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if id(p) in kept else torch.bfloat16), name
    assert model.pixel_mean.dtype == torch.float32
    memory = []
    for m in (reference, model):
        m.transformer.encoder.register_forward_hook(lambda _, args, out: memory.append(out.float()))
    with torch.no_grad():
        images = reference.preprocess_image(_image())
        features = [m.backbone(images.tensor) for m in (reference, model)]
        outputs = [m(_image())[0]["instances"] for m in (reference, model)]
    for key, expected in features[0].items():
        assert features[1][key].dtype == torch.bfloat16
        assert (features[1][key].float() - expected).norm() / expected.norm() < 0.02, key
    assert (memory[1] - memory[0]).norm() / memory[0].norm() < 0.02
    assert outputs[1].scores.dtype == torch.float32 and outputs[1].pred_boxes.tensor.dtype == torch.float32


@needs_ext
def test_config_converts_at_first_inference_call_and_refuses_training_and_loading():
    """``MODEL.DINO.INFERENCE_DTYPE bfloat16``: the model is float32 when built (checkpoints load as usual),
    converted at its first inference call; then a training forward and ``load_state_dict`` fail clearly.
    The default (float32) never converts."""
    plain = _demo_model()
    state = copy.deepcopy(plain.state_dict())
    with torch.no_grad():
        plain(_image())
    assert plain.prepared_dtype is None and plain.backbone.stem.conv1.norm is not None

    model = _demo_model("MODEL.DINO.INFERENCE_DTYPE", "bfloat16")
    assert model.backbone.stem.conv1.weight.dtype == torch.float32
    model.load_state_dict(state)
    with torch.no_grad():
        model(_image())
    assert model.prepared_dtype == torch.bfloat16 and model.backbone.stem.conv1.norm is None
    model.train()
    with pytest.raises(RuntimeError, match="converted for torch.bfloat16 inference .* cannot be trained"):
        model(_image())
    with pytest.raises(RuntimeError, match="cannot load weights into a model converted"):
        model.load_state_dict(state)
    with pytest.raises(RuntimeError, match="already prepared for torch.bfloat16"):
        model.prepare_for_inference(torch.float16)


def test_bad_inference_dtype_names_the_key():
    with pytest.raises(ValueError, match="MODEL.DINO.INFERENCE_DTYPE must be float32, bfloat16, float16 or auto"):
        _demo_model("MODEL.DINO.INFERENCE_DTYPE", "bf16")


@needs_ext
def test_threads_sharing_a_model_convert_it_once(monkeypatch):
    """Two threads making the first inference call of one model at the same time (a shared predictor):
    the in-place conversion runs once (twice would fold the batch norms into already folded weights)."""
    from dino_detr.modeling import meta_arch

    calls = []

    def slow_fold(module):
        calls.append(module)
        time.sleep(0.5)  # the second thread arrives while the first converts
        return fold_batch_norms(module)

    monkeypatch.setattr(meta_arch, "fold_batch_norms", slow_fold)
    model = _demo_model("MODEL.DINO.INFERENCE_DTYPE", "bfloat16")

    def infer():
        with torch.no_grad():
            model(_image())

    threads = [threading.Thread(target=infer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and model.prepared_dtype == torch.bfloat16
