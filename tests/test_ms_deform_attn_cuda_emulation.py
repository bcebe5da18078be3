"""The CUDA kernels of multi-scale deformable attention on the host emulation (tests/cuda_emulation),
beyond the shared checks of test_ms_deform_attn_cuda.py, for every kernel variant: grid-stride tails
on 1-3-block grids, every output element written (the output starts as NaN), channel counts 1..65
(every lane-group size, whole and partial vector slices), empty inputs, bad and overflowing level
layouts (a device-side assertion, like the CPU's error), half precision with float32 locations,
tensors off the 16-byte alignment, FMA-agreement with the CPU kernel at pixel centres, and the
deterministic backward bitwise identical under other schedules (block and thread orders, grid sizes)."""

import pytest
import torch

from dino_detr.layers import ms_deform_attn, ms_deform_attn_reference

from cuda_emulation.msda_emu import KERNELS
from msda_inputs import make_inputs

VARIANTS = [k for k in KERNELS if k != "baseline"]  # beside the baseline where a test is costly


@pytest.fixture(params=KERNELS)
def kernel(request):
    return request.param


@pytest.mark.parametrize(
    "kind,error",
    [
        (1, "omits the calling lane"),
        (2, "which has exited"),
        (3, "divergent shuffle"),
        (4, "outside shuffle mask"),
        (5, "misaligned address: 16-byte access at 4 bytes"),
    ],
)
def test_emulator_rejects_what_is_undefined_on_a_gpu(cuda_emulation, kind, error):
    """The emulator's warp rules themselves: a correct xor reduction sums its warp; a shuffle mask
    without the caller, naming an exited lane, split over two calls, or read outside is an error,
    and so is a vector access off its alignment."""
    emu = cuda_emulation()
    assert emu.selftest(0) == sum(range(32))
    with pytest.raises(RuntimeError, match=error):
        emu.selftest(kind)


def test_emulator_reverse_schedule(cuda_emulation):
    """Threads run block by block, in order, or all in reverse order (another order of the atomics)."""
    assert cuda_emulation().schedule_order() == list(range(8))
    assert cuda_emulation(reverse=True).schedule_order() == list(range(7, -1, -1))


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
def test_grid_stride_tails(cuda_emulation, kernel, max_blocks, channels):
    """A grid of 1-3 blocks (a small GPU) covers many more (n, q, m) groups by its stride loops,
    with a partial last round."""
    emu = cuda_emulation(max_blocks=max_blocks, kernel=kernel)
    heads, queries = 3, 37  # 2 * 37 * 3 = 222 groups: 1.7 .. 111 blocks' worth
    inputs = make_inputs(2, [[5, 4], [2, 3], [1, 1]], heads, channels, queries, 2, seed=max_blocks, locations="smooth")
    _check_float64(emu, inputs, seed=channels)


# The deterministic backward runs the vectorized kernel's lane layout (another grad_value sink):
# the group sizes and slice tails of every D are the vectorized kernel's; a subset suffices.
CHANNEL_COUNTS = [(k, d) for k in ("baseline", "vectorized") for d in range(1, 66)] + [
    ("deterministic", d) for d in (1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 32, 33, 63, 64, 65)
]


@pytest.mark.parametrize("kernel,channels", CHANNEL_COUNTS)
def test_every_channel_count_float64(cuda_emulation, kernel, channels):
    """D = 1..65: lane groups of 1, 2, 4, 8, 16 and 32 lanes, full and partial channel rounds
    (float64: 2 channels per vector slice, so odd D ends in a partial slice)."""
    inputs = make_inputs(1, [[3, 4], [2, 2]], 2, channels, 5, 2, seed=channels, locations="smooth")
    _check_float64(cuda_emulation(kernel=kernel), inputs, seed=channels)


@pytest.mark.parametrize("kernel", VARIANTS)
@pytest.mark.parametrize("channels", [1, 3, 4, 5, 8, 12, 13, 32, 36])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vector_slices_whole_and_partial(cuda_emulation, kernel, channels, dtype):
    """float32 (4 channels per 16-byte slice) and float16 (8): D a multiple of the slice (vector
    accesses) or not (element accesses, a partial last slice); the forward is bitwise the
    baseline's (same summation order per channel), the backward within float32 rounding of it."""
    inputs = make_inputs(2, [[5, 4], [3, 3], [1, 2]], 3, channels, 9, 3, dtype=torch.float32, seed=channels)
    inputs = tuple(t.to(dtype) if i == 0 else t for i, t in enumerate(inputs))
    grad_out = torch.randn(2, 9, 3 * channels, generator=torch.Generator().manual_seed(1)).to(dtype)
    base, variant = cuda_emulation(), cuda_emulation(kernel=kernel)
    assert torch.equal(variant.forward(*inputs), base.forward(*inputs))
    for got, want in zip(variant.backward(grad_out, *inputs), base.backward(grad_out, *inputs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", VARIANTS)
def test_misaligned_tensors_take_the_element_path(cuda_emulation, kernel):
    """Tensors 4 bytes past a 16-byte boundary (a view with a storage offset): the vectorized
    kernels must not use 16-byte accesses there (the emulator faults on one, as a GPU does)."""
    inputs = make_inputs(2, [[5, 4], [2, 3]], 2, 8, 7, 2, dtype=torch.float32, seed=3, locations="smooth")
    grad_out = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(2))
    aligned, misaligned = cuda_emulation(kernel=kernel), cuda_emulation(kernel=kernel, misalign=1)
    assert torch.equal(misaligned.forward(*inputs), aligned.forward(*inputs))
    for got, want in zip(misaligned.backward(grad_out, *inputs), aligned.backward(grad_out, *inputs)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_output_written_everywhere_without_zero_fill(cuda_emulation, kernel):
    """The forward's output is not zero-filled: rows whose samples all miss the map must still be
    written (0), never left as the buffer's NaN."""
    value, shapes, starts, loc, weights = make_inputs(2, [[3, 4], [2, 2]], 2, 3, 6, 2, seed=1)
    loc[:, ::2] = 1.7  # every sample of the even queries lies outside all maps
    out = cuda_emulation(kernel=kernel).forward(value, shapes, starts, loc, weights, prefill=float("nan"))
    assert not out.isnan().any()
    assert (out[:, ::2] == 0).all() and (out[:, 1::2] != 0).any()
    torch.testing.assert_close(out, ms_deform_attn_reference(value, shapes, starts, loc, weights))


@pytest.mark.parametrize("batch,queries,heads,channels", [(0, 4, 2, 3), (2, 0, 2, 3), (2, 4, 2, 0)])
def test_empty_inputs(cuda_emulation, kernel, batch, queries, heads, channels):
    emu = cuda_emulation(kernel=kernel)
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
def test_bad_layout_is_a_device_side_error(cuda_emulation, kernel, layout):
    """A layout that does not tile value's S axis stops the kernels (as the CPU kernel raises),
    in the forward and in the backward, instead of skipping a level or reading outside value."""
    shapes, starts, spatial = layout
    emu = cuda_emulation(kernel=kernel)
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


def test_pixel_centres_agree_with_cpu_kernel(cuda_emulation, kernel):
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
    emulated = cuda_emulation(kernel=kernel).backward(grad_out, value, spatial_shapes, starts, loc, weights)
    cpu = torch.ops.dino_detr.ms_deform_attn_backward(grad_out, value, spatial_shapes, starts, loc, weights)
    for e, c in zip(emulated, cpu):
        torch.testing.assert_close(e, c, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_value_float32_locations_keep_precision(cuda_emulation, kernel, dtype):
    """With float32 locations a half-precision value samples where float32 does: the output and
    grad_value are the float32 ones on the rounded value, rounded once; half locations would move
    the samples."""
    inputs = make_inputs(1, [[40, 167]], 2, 8, 30, 4, dtype=torch.float32, seed=5, locations="smooth")
    value, shapes, starts, loc, weights = inputs
    emu = cuda_emulation(kernel=kernel)
    full = emu.forward(value.to(dtype).float(), shapes, starts, loc, weights)
    mixed = emu.forward(value.to(dtype), shapes, starts, loc, weights)
    torch.testing.assert_close(mixed, full.to(dtype), rtol=0, atol=0)
    half_loc = emu.forward(value.to(dtype), shapes, starts, loc.to(dtype), weights.to(dtype))
    assert (half_loc != mixed).float().mean() > 0.5
    grad_out = torch.randn(full.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads_full = emu.backward(grad_out.float(), value.to(dtype).float(), shapes, starts, loc, weights)
    grads_mixed = emu.backward(grad_out, value.to(dtype), shapes, starts, loc, weights)
    # The vectorized backward sums a sample's channel products in slices of 16 bytes: other
    # slices for half and float32 values, so the location gradients differ by float32 rounding.
    tol = 0 if kernel == "baseline" else 1e-5
    for i, (mixed, full, want_dtype) in enumerate(zip(grads_mixed, grads_full, (dtype, torch.float32, torch.float32))):
        assert mixed.dtype == want_dtype
        torch.testing.assert_close(mixed, full.to(want_dtype), rtol=tol if i else 0, atol=tol if i else 0)


def _schedules(cuda_emulation, kernel):
    """The emulated kernel under other schedules: grids of 1, 3 and all blocks, forward and reverse."""
    return [cuda_emulation(max_blocks=b, kernel=kernel, reverse=r) for b in (0, 1, 3) for r in (False, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_backward_is_bitwise_identical_under_any_schedule(cuda_emulation, dtype):
    """The deterministic backward (int64 fixed-point atomics) gives the same bits whatever the
    order of its atomics; the baseline's float atomics do not (what makes this test able to fail)."""
    inputs = make_inputs(2, [[6, 5], [2, 2], [1, 1]], 2, 8, 40, 4, dtype=torch.float32, seed=4)
    inputs = tuple(t.to(dtype) if i == 0 else t for i, t in enumerate(inputs))
    grad_out = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(3)).to(dtype)

    def runs(kernel):
        return [emu.backward(grad_out, *inputs) for emu in _schedules(cuda_emulation, kernel)]

    baseline = runs("baseline")
    assert not all(torch.equal(r[0], baseline[0][0]) for r in baseline)
    deterministic = runs("deterministic")
    for r in deterministic[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, deterministic[0]))
    rtol = 2.0**-7 if dtype == torch.bfloat16 else 1e-5  # one bfloat16 rounding of grad_value apart
    for got, want in zip(deterministic[0], baseline[0]):
        torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=1e-5)


def test_deterministic_backward_error_bound(cuda_emulation):
    """float32 grad_value of the fixed-point sums within the stated bound of the float64 sums:
    (Lq * P)^2 * max|grad_out| * max|attn| * 2^-61 for the fixed point, plus float32 rounding."""
    inputs = make_inputs(1, [[4, 4], [1, 1]], 2, 4, 300, 4, dtype=torch.float64, seed=6)
    grad_out = 1e3 * torch.randn(1, 300, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    exact = cuda_emulation().backward(grad_out, *inputs)[0]
    got = cuda_emulation(kernel="deterministic").backward(
        grad_out.float(), *(t.float() for t in inputs[:1]), *inputs[1:3], *(t.float() for t in inputs[3:])
    )[0]
    bound = (300 * 4) ** 2 * grad_out.abs().max() * inputs[4].abs().max() * 2.0**-61
    error = (got.double() - exact).abs()
    assert (error <= bound + 2 * 2.0**-24 * exact.abs() + 1e-5 * grad_out.abs().max()).all()


def test_deterministic_backward_non_finite_gradients(cuda_emulation):
    """A NaN or an infinity in grad_output reaches grad_value as in the baseline (through the
    float side buffer), the finite elements stay exact."""
    inputs = make_inputs(1, [[4, 4], [2, 2]], 2, 4, 12, 2, dtype=torch.float32, seed=8)
    grad_out = torch.randn(1, 12, 8, generator=torch.Generator().manual_seed(5))
    grad_out[0, 3, 1], grad_out[0, 7, 6] = float("nan"), float("inf")
    want = cuda_emulation().backward(grad_out, *inputs)[0]
    got = cuda_emulation(kernel="deterministic").backward(grad_out, *inputs)[0]
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert got.isnan().any() and got.isinf().any()
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)
