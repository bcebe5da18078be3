"""The CUDA kernels of multi-scale deformable attention on the host emulation (tests/cuda_emulation),
beyond the shared checks of test_ms_deform_attn_cuda.py: grid-stride tails on 1-3-block grids, every
output element written (the output starts as NaN), channel counts 1..65 (every lane-group size),
empty inputs, bad and overflowing level layouts (a device-side assertion, like the CPU's error),
half precision with float32 locations, and FMA-agreement with the CPU kernel at pixel centres."""

import pytest
import torch

from dino_detr.layers import ms_deform_attn, ms_deform_attn_reference

from msda_inputs import make_inputs


@pytest.mark.parametrize(
    "kind,error",
    [
        (1, "omits the calling lane"),
        (2, "which has exited"),
        (3, "divergent shuffle"),
        (4, "outside shuffle mask"),
    ],
)
def test_emulator_rejects_what_is_undefined_on_a_gpu(cuda_emulation, kind, error):
    """The emulator's warp rules themselves: a correct xor reduction sums its warp; a shuffle mask
    without the caller, naming an exited lane, split over two calls, or read outside is an error."""
    emu = cuda_emulation()
    assert emu.selftest(0) == sum(range(32))
    with pytest.raises(RuntimeError, match=error):
        emu.selftest(kind)


def _check_float64(emu, inputs, seed=0):
    """Forward and all gradients of the emulated kernels against the reference (float64)."""
    value = inputs[0]
    out = emu.forward(*inputs)
    torch.testing.assert_close(out, ms_deform_attn_reference(*inputs), rtol=1e-9, atol=1e-9)
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ref_inputs = tuple(t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in inputs)
    ref = torch.autograd.grad(
        ms_deform_attn_reference(*ref_inputs), (ref_inputs[0], ref_inputs[3], ref_inputs[4]), grad_out
    )
    for got, want in zip(emu.backward(grad_out, *inputs), ref):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)
    assert out.shape == (value.shape[0], inputs[3].shape[1], value.shape[2] * value.shape[3])


@pytest.mark.parametrize("max_blocks", [1, 2, 3])
@pytest.mark.parametrize("channels", [2, 5, 32])
def test_grid_stride_tails(cuda_emulation, max_blocks, channels):
    """A grid of 1-3 blocks (a small GPU) covers many more (n, q, m) groups by its stride loops,
    with a partial last round."""
    emu = cuda_emulation(max_blocks=max_blocks)
    heads, queries = 3, 37  # 2 * 37 * 3 = 222 groups: 1.7 .. 111 blocks' worth
    inputs = make_inputs(2, [[5, 4], [2, 3], [1, 1]], heads, channels, queries, 2, seed=max_blocks, locations="smooth")
    _check_float64(emu, inputs, seed=channels)


@pytest.mark.parametrize("channels", range(1, 66))
def test_every_channel_count_float64(cuda_emulation, channels):
    """D = 1..65: lane groups of 1, 2, 4, 8, 16 and 32 lanes, full and partial channel rounds."""
    inputs = make_inputs(1, [[3, 4], [2, 2]], 2, channels, 5, 2, seed=channels, locations="smooth")
    _check_float64(cuda_emulation(), inputs, seed=channels)


def test_output_written_everywhere_without_zero_fill(cuda_emulation):
    """The forward's output is not zero-filled: rows whose samples all miss the map must still be
    written (0), never left as the buffer's NaN."""
    value, shapes, starts, loc, weights = make_inputs(2, [[3, 4], [2, 2]], 2, 3, 6, 2, seed=1)
    loc[:, ::2] = 1.7  # every sample of the even queries lies outside all maps
    out = cuda_emulation().forward(value, shapes, starts, loc, weights, prefill=float("nan"))
    assert not out.isnan().any()
    assert (out[:, ::2] == 0).all() and (out[:, 1::2] != 0).any()
    torch.testing.assert_close(out, ms_deform_attn_reference(value, shapes, starts, loc, weights))


@pytest.mark.parametrize("batch,queries,heads,channels", [(0, 4, 2, 3), (2, 0, 2, 3), (2, 4, 2, 0)])
def test_empty_inputs(cuda_emulation, batch, queries, heads, channels):
    emu = cuda_emulation()
    inputs = make_inputs(batch, [[2, 3]], heads, channels, queries, 2)
    out = emu.forward(*inputs)
    assert out.shape == (batch, queries, heads * channels)
    grads = emu.backward(torch.zeros_like(out), *inputs)
    for grad, t in zip(grads, (inputs[0], inputs[3], inputs[4])):
        assert grad.shape == t.shape and (grad == 0).all()


def _bad_layouts():
    """(spatial_shapes, level_start_index, S) that do not tile S, including int64 overflows."""
    yield [[3, 4], [2, 2]], [0, 12], 14  # sums to 16
    yield [[3, 4], [2, 2]], [0, 13], 16  # start off by one
    yield [[3, 4], [2, 2]], [0, 11], 16
    yield [[4, 4], [0, 2]], [0, 16], 16  # empty level
    yield [[3, 4], [-2, -2]], [0, 12], 16
    yield [[3, 4]], [0], 13  # sums to less than S
    yield [[2**62 + 1, 4]], [0], 4  # H * W wraps around 2**64 to 4
    yield [[2**32, 2**32], [2, 2]], [0, 0], 4  # the first level's size wraps to 0
    yield [[2, 2], [2**31, 2**33]], [0, 4], 4


@pytest.mark.parametrize("layout", list(_bad_layouts()), ids=str)
def test_bad_layout_is_a_device_side_error(cuda_emulation, layout):
    """A layout that does not tile value's S axis stops the kernels (as the CPU kernel raises),
    in the forward and in the backward, instead of skipping a level or reading outside value."""
    shapes, starts, spatial = layout
    emu = cuda_emulation()
    value, _, _, loc, weights = make_inputs(2, [[1, spatial]], 2, 3, 5, 2)
    loc = loc[:, :, :, :1].expand(-1, -1, -1, len(shapes), -1, -1).contiguous()
    weights = weights[:, :, :, :1].expand(-1, -1, -1, len(shapes), -1).contiguous()
    shapes, starts = torch.tensor(shapes), torch.tensor(starts)
    with pytest.raises(RuntimeError, match="device-side assertion"):
        emu.forward(value, shapes, starts, loc, weights)
    with pytest.raises(RuntimeError, match="device-side assertion"):
        emu.backward(torch.ones(2, 5, 6, dtype=value.dtype), value, shapes, starts, loc, weights)
    with pytest.raises((ValueError, RuntimeError)):
        ms_deform_attn(value, shapes, starts, loc, weights)


def test_pixel_centres_agree_with_cpu_kernel(cuda_emulation):
    """Location gradients at exact pixel centres (i + 0.5) / W in float32, where the corner choice
    hangs on the rounding of loc * W - 0.5: both kernels fuse it into one FMA, so they agree
    (without the explicit FMA, nvcc contracts it and the host compiler need not: then either the
    FMA-contracting base build or the non-contracting sanitizer build disagrees with the CPU kernel)."""
    shapes = [[7, 38], [13, 167]]  # wide levels: loc * W rounds at pixel centres often
    g = torch.Generator().manual_seed(0)
    value, spatial_shapes, starts, _, weights = make_inputs(2, shapes, 2, 4, 30, 3, dtype=torch.float32)
    centres = []
    for h, w in shapes:
        x = (torch.randint(0, w, (2, 30, 2, 1, 3), generator=g) + 0.5) / w
        y = (torch.randint(0, h, (2, 30, 2, 1, 3), generator=g) + 0.5) / h
        centres.append(torch.stack([x, y], -1).float())
    loc = torch.cat(centres, 3)
    grad_out = torch.randn(2, 30, 8, generator=g)
    emulated = cuda_emulation().backward(grad_out, value, spatial_shapes, starts, loc, weights)
    cpu = torch.ops.dino_detr.ms_deform_attn_backward(grad_out, value, spatial_shapes, starts, loc, weights)
    for e, c in zip(emulated, cpu):
        torch.testing.assert_close(e, c, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_value_float32_locations_keep_precision(cuda_emulation, dtype):
    """With float32 locations a half-precision value samples where float32 does: the output is the
    float32 output on the rounded value, rounded once; half locations would move the samples."""
    inputs = make_inputs(1, [[40, 167]], 2, 8, 30, 4, dtype=torch.float32, seed=5, locations="smooth")
    value, shapes, starts, loc, weights = inputs
    emu = cuda_emulation()
    full = emu.forward(value.to(dtype).float(), shapes, starts, loc, weights)
    mixed = emu.forward(value.to(dtype), shapes, starts, loc, weights)
    torch.testing.assert_close(mixed, full.to(dtype), rtol=0, atol=0)
    half_loc = emu.forward(value.to(dtype), shapes, starts, loc.to(dtype), weights.to(dtype))
    assert (half_loc != mixed).float().mean() > 0.5
    grad_out = torch.randn(full.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads_full = emu.backward(grad_out.float(), value.to(dtype).float(), shapes, starts, loc, weights)
    grads_mixed = emu.backward(grad_out, value.to(dtype), shapes, starts, loc, weights)
    for mixed, full, want_dtype in zip(grads_mixed, grads_full, (dtype, torch.float32, torch.float32)):
        assert mixed.dtype == want_dtype
        torch.testing.assert_close(mixed, full.to(want_dtype), rtol=0, atol=0)
