"""Multi-scale deformable attention op: native kernels vs the grid_sample reference,
finite-difference gradients, input validation, and the build/fallback of dino_detr._C."""

import os
import subprocess
import sys

import pytest
import torch

from dino_detr.layers import ms_deform_attn, ms_deform_attn_reference, native_extension_available

from child_process import child_env
from msda_inputs import make_inputs, naive_ms_deform_attn, random_case

REQUIRE_EXT = os.environ.get("DINO_DETR_REQUIRE_EXT") == "1"
needs_ext = pytest.mark.skipif(not native_extension_available() and not REQUIRE_EXT, reason="dino_detr._C is not built")


def with_grad(inputs):
    return tuple(t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in inputs)


def grads(fn, inputs, grad_out):
    inputs = with_grad(inputs)
    out = fn(*inputs)
    return torch.autograd.grad(out, (inputs[0], inputs[3], inputs[4]), grad_out)


def test_extension_built_and_used():
    if not REQUIRE_EXT and not native_extension_available():
        pytest.skip("dino_detr._C is not built (set DINO_DETR_REQUIRE_EXT=1 to require it)")
    assert native_extension_available(), "dino_detr._C is required (DINO_DETR_REQUIRE_EXT=1) but not importable"
    from dino_detr import _C

    assert _C.WITH_CUDA or not torch.cuda.is_available(), "a GPU is present but the CUDA kernels were not built"
    inputs = make_inputs(1, [[3, 4]], 2, 3, 5, 2)
    with torch.autograd.profiler.profile() as prof:
        ms_deform_attn(*inputs)
    assert "dino_detr::ms_deform_attn" in {e.name for e in prof.function_events}


@needs_ext
@pytest.mark.parametrize("seed", range(24))
def test_forward_matches_reference(seed):
    batch, shapes, heads, channels, queries, points = random_case(seed)
    inputs = make_inputs(batch, shapes, heads, channels, queries, points, seed=seed)
    out = ms_deform_attn(*inputs)
    assert out.shape == (batch, queries, heads * channels)
    torch.testing.assert_close(out, ms_deform_attn_reference(*inputs), rtol=1e-10, atol=1e-10)


@needs_ext
@pytest.mark.parametrize("shapes", [[[1, 1]], [[4, 7]], [[7, 4], [3, 5], [2, 2], [1, 3], [1, 1]]])
@pytest.mark.parametrize("channels", [1, 3, 32])
def test_forward_float32_and_fixed_sizes(shapes, channels):
    """float32 kernels, and the channel counts the CPU kernel specializes (16, 32, 64) next to generic ones."""
    inputs = make_inputs(2, shapes, 4, channels, 9, 3, dtype=torch.float32, seed=channels)
    torch.testing.assert_close(ms_deform_attn(*inputs), ms_deform_attn_reference(*inputs), rtol=1e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("seed", range(8))
def test_backward_matches_reference(seed):
    batch, shapes, heads, channels, queries, points = random_case(100 + seed)
    inputs = make_inputs(batch, shapes, heads, channels, queries, points, seed=seed, locations="smooth")
    grad_out = torch.randn(batch, queries, heads * channels, dtype=torch.float64)
    for native, ref in zip(grads(ms_deform_attn, inputs, grad_out), grads(ms_deform_attn_reference, inputs, grad_out)):
        torch.testing.assert_close(native, ref, rtol=1e-9, atol=1e-9)


@needs_ext
@pytest.mark.parametrize("shapes,heads,channels,points", [([[3, 4]], 2, 3, 2), ([[4, 3], [2, 2], [1, 1]], 3, 2, 3)])
def test_gradcheck(shapes, heads, channels, points):
    inputs = with_grad(make_inputs(2, shapes, heads, channels, 3, points, seed=7, locations="smooth"))
    assert torch.autograd.gradcheck(ms_deform_attn, inputs, eps=1e-6, atol=1e-6)


@needs_ext
def test_non_contiguous_inputs():
    value, shapes, starts, loc, weights = make_inputs(2, [[5, 3], [2, 4]], 3, 5, 6, 2, seed=3)
    # Same values in transposed / strided storage.
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_nc = torch.stack([loc, loc], -1)[..., 0]
    weights_nc = weights.transpose(0, 1).contiguous().transpose(0, 1)
    shapes_nc = shapes.t().contiguous().t()
    starts_nc = torch.stack([starts, starts], 1)[:, 1]
    assert not any(t.is_contiguous() for t in (value_nc, loc_nc, weights_nc, shapes_nc, starts_nc))
    torch.testing.assert_close(
        ms_deform_attn(value_nc, shapes_nc, starts_nc, loc_nc, weights_nc),
        ms_deform_attn(value, shapes, starts, loc, weights),
        rtol=0,
        atol=0,
    )


@needs_ext
def test_empty_batch_and_queries():
    for batch, queries in ((0, 4), (2, 0)):
        inputs = with_grad(make_inputs(batch, [[2, 3]], 2, 4, queries, 2))
        out = ms_deform_attn(*inputs)
        assert out.shape == (batch, queries, 8)
        out.sum().backward()
        assert inputs[0].grad.shape == inputs[0].shape


def _bad_inputs():
    good = make_inputs(2, [[3, 4], [2, 2]], 2, 3, 5, 2, dtype=torch.float32)
    value, shapes, starts, loc, weights = good
    yield "rank 4", (value[0], shapes, starts, loc, weights)
    yield "rank 6", (value, shapes, starts, loc[..., 0], weights)
    yield "rank 5", (value, shapes, starts, loc, weights[0])
    yield "rank 1", (value, shapes, starts[None], loc, weights)
    yield r"\(L, 2\)", (value, torch.tensor([[3, 4, 1], [2, 2, 1]]), starts, loc, weights)
    yield "sum to 16 positions but value has S=14", (value[:, :14], shapes, starts, loc, weights)
    yield "level_start_index.* inconsistent", (value, shapes, torch.tensor([0, 11]), loc, weights)
    yield "positive", (value, torch.tensor([[4, 4], [0, 2]]), torch.tensor([0, 16]), loc, weights)
    yield "level count mismatch", (value, shapes[:1], starts[:1], loc, weights)
    yield (
        "level count mismatch: spatial_shapes has 2, level_start_index has 1",
        (value, shapes, starts[:1], loc, weights),
    )
    yield "head count mismatch", (value[:, :, :1], shapes, starts, loc, weights)
    yield "point count mismatch", (value, shapes, starts, loc, weights[..., :1])
    yield "query count mismatch", (value, shapes, starts, loc, weights[:, :4])
    yield "batch size mismatch", (value[:1], shapes, starts, loc, weights)
    yield "mixed float dtypes", (value.double(), shapes, starts, loc, weights)
    yield "mixed float dtypes", (value, shapes, starts, loc, weights.double())
    yield "value must be a floating-point", (value.long(), shapes, starts, loc.long(), weights.long())
    yield "sampling_locations must be a floating-point", (value, shapes, starts, loc.int(), weights)
    yield "spatial_shapes must be int64", (value, shapes.int(), starts, loc, weights)
    yield "spatial_shapes must be int64", (value, shapes.float(), starts, loc, weights)
    yield "level_start_index must be int64", (value, shapes, starts.int(), loc, weights)
    yield "torch.Tensor", (value.tolist(), shapes, starts, loc, weights)
    if torch.cuda.is_available():
        yield "one device", (value.cuda(), shapes, starts, loc.cuda(), weights.cuda())


_LAYOUT_ERRORS = ("sum to", "inconsistent", "positive")  # checks that read the tensors' data


@pytest.mark.parametrize("match,inputs", list(_bad_inputs()), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_inputs_raise(match, inputs):
    with pytest.raises((ValueError, TypeError), match=match):
        ms_deform_attn(*inputs)


@needs_ext
@pytest.mark.parametrize(
    "match,inputs",
    [case for case in _bad_inputs() if case[0] != "torch.Tensor"],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_native_op_and_fake_kernel_raise(match, inputs):
    """The C++ op itself raises each error (no Python check runs before it); its fake kernel, which
    runs at trace time instead of the C++ checks, raises the same error type for all but the level
    layout (which only the kernels can read)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    inputs = [t.contiguous() for t in inputs]
    with pytest.raises((ValueError, TypeError), match=match) as native:
        torch.ops.dino_detr.ms_deform_attn(*inputs)
    if any(word in match for word in _LAYOUT_ERRORS):
        return
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in inputs]
        with pytest.raises(native.type, match=match):
            torch.ops.dino_detr.ms_deform_attn(*fake)


@needs_ext
def test_native_op_error_types():
    """The C++ checks raise ValueError for a shape, layout or memory layout and TypeError for a dtype,
    naming the tensor, what it is and what was expected."""
    value, shapes, starts, loc, weights = make_inputs(1, [[3, 4], [2, 2]], 2, 3, 5, 2, dtype=torch.float32)
    op = torch.ops.dino_detr.ms_deform_attn
    with pytest.raises(ValueError, match=r"value must have rank 4 \(N, S, M, D\), got shape \[16, 2, 3\]"):
        op(value[0], shapes, starts, loc, weights)
    with pytest.raises(ValueError, match="head count mismatch: value has 1, attention_weights has 2"):
        op(value[:, :, :1].contiguous(), shapes, starts, loc[:, :, :1].contiguous(), weights)
    with pytest.raises(TypeError, match="level_start_index must be int64, got torch.int32"):
        op(value, shapes, starts.int(), loc, weights)
    with pytest.raises(ValueError, match=r"value must be contiguous, got strides \[96, 3, 48, 1\]"):
        op(value.transpose(1, 2).contiguous().transpose(1, 2), shapes, starts, loc, weights)
    with pytest.raises(ValueError, match="sum to 16 positions but value has S=14"):
        op(value[:, :14].contiguous(), shapes, starts, loc, weights)
    with pytest.raises(ValueError, match=r"level_start_index\[1\] is 13, inconsistent with spatial_shapes"):
        op(value, shapes, torch.tensor([0, 13]), loc, weights)


def test_fallback_warns_once_and_matches_reference():
    """Without dino_detr._C: one warning, the reference's result, and each bad input refused by the
    Python checks."""
    script = (
        "import sys, warnings\n"
        "sys.modules['dino_detr._C'] = None  # as if the extension were not built\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from dino_detr.layers import ms_deform_attn, ms_deform_attn_reference, native_extension_available\n"
        "    sys.path.insert(0, 'tests')\n"
        "    from msda_inputs import make_inputs\n"
        "    inputs = make_inputs(1, [[3, 4]], 2, 3, 5, 2)\n"
        "    out = [ms_deform_attn(*inputs) for _ in range(2)][-1]\n"
        "msgs = [str(w.message) for w in caught if 'dino_detr._C' in str(w.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'pip install --no-build-isolation -e .' in msgs[0], msgs[0]\n"
        "assert not native_extension_available()\n"
        "assert (out - ms_deform_attn_reference(*inputs)).abs().max() == 0\n"
        "import re\n"
        "from test_ms_deform_attn import _bad_inputs\n"
        "for match, bad in _bad_inputs():  # the Python checks, which stand in for the C++ ones here\n"
        "    try:\n"
        "        ms_deform_attn(*bad)\n"
        "    except (ValueError, TypeError) as e:\n"
        "        assert re.search(match, str(e)), (match, str(e))\n"
        "    else:\n"
        "        raise AssertionError(f'accepted: {match}')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = child_env(OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("seed", range(3))
def test_reference_matches_definition(seed):
    """The grid_sample reference against a loop written from the definition (independent check of the semantics)."""
    shapes = [[3, 5], [2, 1], [1, 1]]
    inputs = make_inputs(2, shapes, 2, 3, 4, 3, seed=seed)
    value, spatial_shapes, _, loc, weights = inputs
    torch.testing.assert_close(
        ms_deform_attn_reference(*inputs),
        naive_ms_deform_attn(value, spatial_shapes, loc, weights),
        rtol=1e-10,
        atol=1e-10,
    )


def test_pixel_centres_and_borders():
    """A sample on a pixel centre returns that pixel; on the map's border half of the edge pixel; half a
    pixel or more outside the border, zero (Deformable DETR's bilinear rule with zero padding)."""
    value, shapes, starts, _, _ = make_inputs(1, [[2, 4]], 1, 2, 1, 1)
    pixel = value[0].view(2, 4, 2)
    cases = [
        ((2.5 / 4, 0.5 / 2), pixel[0, 2]),
        ((0.0, 0.5 / 2), 0.5 * pixel[0, 0]),
        ((0.5 / 4, 1.0), 0.5 * pixel[1, 0]),
        ((1.0 + 0.5 / 4, 0.5 / 2), torch.zeros(2, dtype=value.dtype)),
        ((0.5 / 4, 1.0 + 0.6 / 2), torch.zeros(2, dtype=value.dtype)),
        ((-0.125, 0.25), torch.zeros(2, dtype=value.dtype)),
    ]
    weights = torch.ones(1, 1, 1, 1, 1, dtype=value.dtype)
    for (x, y), expected in cases:
        loc = torch.tensor([x, y], dtype=value.dtype).view(1, 1, 1, 1, 1, 2)
        for fn in (ms_deform_attn, ms_deform_attn_reference):
            torch.testing.assert_close(fn(value, shapes, starts, loc, weights)[0, 0], expected, rtol=1e-12, atol=1e-12)


def test_hostile_level_layouts_never_crash():
    """Random and extreme level layouts (sizes whose product wraps around 2**64 and so "sum to S",
    zero, negative, misplaced starts) through the Python op, the raw operators and (when built) the
    emulated CUDA kernels, in a subprocess: each call raises or returns finite values, none crashes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "tests"))
    from cuda_emulation.msda_emu import default_library

    library = default_library()
    args = [sys.executable, os.path.join(root, "tests", "msda_layout_fuzz.py"), "0", "300"]
    if os.path.exists(library):
        args.append(library)
    env = child_env(OMP_NUM_THREADS="1")
    result = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-3000:]}"
    assert "rejected" in result.stdout


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_value_with_float32_locations_reference_and_fake(dtype):
    """A half-precision value with float32 sampling locations and weights: the reference computes
    in float32 and returns value's dtype; the fake kernel and its autograd give the dtypes the
    CUDA op returns (output and grad_value in value's dtype, location / weight gradients float32)."""
    value, shapes, starts, loc, weights = make_inputs(2, [[5, 7], [2, 3]], 2, 4, 6, 2, dtype=torch.float32, seed=4)
    out = ms_deform_attn_reference(value.to(dtype), shapes, starts, loc, weights)
    assert out.dtype == dtype
    torch.testing.assert_close(
        out, ms_deform_attn_reference(value.to(dtype).float(), shapes, starts, loc, weights).to(dtype), rtol=0, atol=0
    )
    if not native_extension_available():
        pytest.skip("dino_detr._C is not built (no fake kernel)")
    meta = [t.to("meta") for t in (value.to(dtype), shapes, starts, loc, weights)]
    meta = [t.requires_grad_() if t.is_floating_point() else t for t in meta]
    out = torch.ops.dino_detr.ms_deform_attn(*meta)
    assert out.dtype == dtype and out.shape == (2, 6, 8)
    grads = torch.autograd.grad(out.sum(), (meta[0], meta[3], meta[4]))
    assert [g.dtype for g in grads] == [dtype, torch.float32, torch.float32]


def test_mixed_dtypes_accepted_only_for_half_value():
    value, shapes, starts, loc, weights = make_inputs(1, [[3, 4]], 2, 3, 5, 2, dtype=torch.float32)
    with pytest.raises(TypeError, match="mixed float dtypes"):
        ms_deform_attn(value.double(), shapes, starts, loc, weights)
    with pytest.raises(TypeError, match="mixed float dtypes: sampling_locations is torch.float32"):
        ms_deform_attn(value.half(), shapes, starts, loc, weights.half())
    if native_extension_available():
        with pytest.raises(TypeError, match="mixed float dtypes: value is torch.float64"):
            torch.ops.dino_detr.ms_deform_attn(value.double(), shapes, starts, loc, weights)


def test_module_keeps_locations_float32_under_autocast(monkeypatch):
    """Under bf16 autocast MSDeformAttn samples at float32 locations: the reference points are not
    rounded to half precision (only the learned offsets, which come out of a half Linear, are)."""
    from dino_detr.layers import MSDeformAttn, ms_deform_attn_module

    torch.manual_seed(0)
    module = MSDeformAttn(embed_dim=32, num_heads=2, num_levels=2, num_points=2)
    shapes = torch.tensor([[100, 152], [50, 76]])
    starts = torch.tensor([0, 100 * 152])
    query = torch.randn(1, 7, 32)
    value = torch.randn(1, 100 * 152 + 50 * 76, 32)
    refs = torch.rand(1, 7, 2, 2)
    seen = []
    monkeypatch.setattr(
        ms_deform_attn_module, "ms_deform_attn", lambda *args: seen.append(args) or ms_deform_attn(*args)
    )
    module(query, refs, value, shapes, starts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module(query, refs, value, shapes, starts)
    full, mixed = seen
    assert mixed[3].dtype == torch.float32 and mixed[4].dtype == torch.float32
    # Offsets (|o| <= ~2.5 cells, bf16: 2**-9 relative) move a location by < 1e-4; rounding the
    # reference points to bf16 would move them by up to 2**-9 (~2e-3).
    assert (mixed[3] - full[3]).abs().max() < 2e-4


@needs_ext
def test_device_layout_is_not_read_on_the_host():
    """A level layout that lives on a device is not read by the Python op (no device sync per call,
    so CUDA graphs can capture it; the CUDA kernels check it on the device): on the meta device,
    whose data cannot be read at all, the op runs through its fake kernel."""
    inputs = [t.to("meta") for t in make_inputs(2, [[3, 4], [2, 2]], 2, 3, 5, 2, dtype=torch.float32)]
    out = ms_deform_attn(*inputs)
    assert out.device.type == "meta" and out.shape == (2, 5, 6)


def test_use_reference_implementation_switch(monkeypatch):
    """Inside ``use_reference_implementation()`` the op runs the pure-PyTorch reference (also with the
    native op built), outside it does not; the switch nests and restores."""
    import importlib

    from dino_detr.layers import use_reference_implementation

    op_module = importlib.import_module("dino_detr.layers.ms_deform_attn")  # the module, not the function

    calls = []

    def spy(*args):
        calls.append(1)
        return ms_deform_attn_reference(*args)

    monkeypatch.setattr(op_module, "ms_deform_attn_reference", spy)
    inputs = make_inputs(1, [[3, 4], [2, 2]], 2, 4, 5, 2, seed=0)
    with use_reference_implementation():
        with use_reference_implementation(False):
            op_module.ms_deform_attn(*inputs)
            inner = len(calls)
        out = op_module.ms_deform_attn(*inputs)
    assert len(calls) == inner + 1
    torch.testing.assert_close(out, ms_deform_attn_reference(*inputs))
    op_module.ms_deform_attn(*inputs)  # outside: the native op, when built
    if native_extension_available():
        assert inner == 0 and len(calls) == 1
