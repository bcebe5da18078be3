"""CUDA kernels of multi-scale deformable attention, with the same assertions on two backends:
``gpu`` (the built op on a GPU; skipped without one) and ``emulated`` (the very kernels and launch
code of dino_detr/csrc/cuda/ms_deform_attn_launch.cuh compiled for the host by tests/cuda_emulation,
run on the CPU; what CI runs), each for every kernel variant (baseline, vectorized, deterministic:
forced by DINO_DETR_MSDA_KERNEL on the GPU). Reference agreement, gradients, fp16/bf16 against fp32,
CPU/CUDA agreement, odd batch sizes, determinism."""

import pytest
import torch

from dino_detr.layers import ms_deform_attn, ms_deform_attn_reference, native_extension_available
from dino_detr.layers.ms_deform_attn_kernels import force_kernel

from cuda_emulation.msda_emu import KERNELS
from msda_inputs import float32_tolerances, make_inputs, random_case


class Backend:
    """Where the CUDA kernels run: ``op`` has ms_deform_attn's signature, inputs go to ``device``."""

    def __init__(self, op, device):
        self.op, self.device = op, device

    def to(self, inputs):
        return tuple(t.to(self.device) for t in inputs)


def _needs_gpu():
    if not (torch.cuda.is_available() and native_extension_available()):
        pytest.skip("needs a GPU and dino_detr._C")


@pytest.fixture(params=[(b, k) for b in ("gpu", "emulated") for k in KERNELS], ids="-".join)
def cuda(request, cuda_emulation, monkeypatch):
    backend, kernel = request.param
    if backend == "gpu":
        _needs_gpu()
        previous = force_kernel(kernel)
        request.addfinalizer(lambda: force_kernel(previous))
        return Backend(ms_deform_attn, "cuda")
    return Backend(cuda_emulation(kernel=kernel).op, "cpu")


def _grads(fn, inputs, grad_out):
    inputs = tuple(t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in inputs)
    return torch.autograd.grad(fn(*inputs), (inputs[0], inputs[3], inputs[4]), grad_out)


@pytest.mark.parametrize("seed", range(12))
def test_cuda_forward_backward_match_reference_float64(cuda, seed):
    batch, shapes, heads, channels, queries, points = random_case(seed)
    inputs = cuda.to(make_inputs(batch, shapes, heads, channels, queries, points, seed=seed, locations="smooth"))
    torch.testing.assert_close(cuda.op(*inputs), ms_deform_attn_reference(*inputs), rtol=1e-9, atol=1e-9)
    grad_out = torch.randn(batch, queries, heads * channels, dtype=torch.float64, device=cuda.device)
    for native, ref in zip(_grads(cuda.op, inputs, grad_out), _grads(ms_deform_attn_reference, inputs, grad_out)):
        torch.testing.assert_close(native, ref, rtol=1e-8, atol=1e-8)


def test_cuda_gradcheck(cuda):
    inputs = cuda.to(make_inputs(2, [[4, 3], [2, 2], [1, 1]], 3, 2, 3, 3, seed=7, locations="smooth"))
    inputs = tuple(t.requires_grad_() if t.is_floating_point() else t for t in inputs)
    assert torch.autograd.gradcheck(cuda.op, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3, 5, 7])
def test_cpu_and_cuda_agree_float32(cuda, batch):
    """DINO-like shapes, batch sizes that no im2col step divides; every element within the bound
    that float32 rounding allows two implementations (msda_inputs.float32_tolerances)."""
    inputs = make_inputs(batch, [[20, 30], [10, 15], [5, 8], [3, 4]], 8, 32, 50, 4, dtype=torch.float32, seed=batch)
    cpu = ms_deform_attn(*inputs)
    grad_out = torch.randn_like(cpu)
    bounds = float32_tolerances(inputs, grad_out)
    results = zip(
        (cpu,) + _grads(ms_deform_attn, inputs, grad_out),
        (cuda.op(*cuda.to(inputs)),) + _grads(cuda.op, cuda.to(inputs), cuda.to((grad_out,))[0]),
        bounds,
    )
    for name, (c, g, bound) in zip(("output", "grad_value", "grad_loc", "grad_attn"), results):
        excess = (g.cpu().double() - c.double()).abs() - bound
        assert excess.max() <= 0, f"{name}: {int((excess > 0).sum())} elements beyond float32 rounding"


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("loc_dtype", ["same", torch.float32])
def test_half_precision_against_float32(cuda, dtype, tol, loc_dtype):
    """Half-precision value (with half or float32 locations and weights) against float32 on the
    same, rounded inputs: what remains is the rounding of the results, not of the inputs."""
    inputs = cuda.to(
        make_inputs(
            2, [[20, 30], [10, 15], [5, 8], [3, 4]], 8, 32, 40, 4, dtype=torch.float32, seed=3, locations="smooth"
        )
    )
    loc_dtype = dtype if loc_dtype == "same" else loc_dtype
    half_inputs = tuple(
        t.to(dtype if i == 0 else loc_dtype) if t.is_floating_point() else t for i, t in enumerate(inputs)
    )
    rounded = tuple(t.float() if t.is_floating_point() else t for t in half_inputs)
    full = cuda.op(*rounded)
    half = cuda.op(*half_inputs)
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), full, rtol=tol, atol=tol * 1e-3)
    grad_out = torch.randn_like(full).to(dtype)
    for h, f, t in zip(
        _grads(cuda.op, half_inputs, grad_out),
        _grads(cuda.op, rounded, grad_out.float()),
        half_inputs[0:1] + half_inputs[3:],
    ):
        assert h.dtype == t.dtype and torch.isfinite(h).all()
        torch.testing.assert_close(h.float(), f, rtol=tol, atol=tol * 1e-3 * f.abs().max())


def test_cuda_rejects_mixed_devices():
    _needs_gpu()
    value, shapes, starts, loc, weights = make_inputs(1, [[3, 4]], 2, 4, 5, 2, dtype=torch.float32, device="cuda")
    with pytest.raises(ValueError, match="one device"):
        ms_deform_attn(value, shapes.cpu(), starts, loc, weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backward_is_deterministic_under_deterministic_algorithms(dtype):
    """torch.use_deterministic_algorithms(True): the backward runs its deterministic kernel
    (whatever DINO_DETR_MSDA_KERNEL says), bitwise identical run to run, and close to the default."""
    _needs_gpu()
    inputs = make_inputs(2, [[40, 60], [20, 30], [10, 15], [5, 8]], 8, 32, 2000, 4, dtype=torch.float32, device="cuda")
    inputs = tuple(t.to(dtype) if i == 0 else t for i, t in enumerate(inputs))
    grad_out = torch.randn(2, 2000, 256, device="cuda").to(dtype)
    default = _grads(ms_deform_attn, inputs, grad_out)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_grads(ms_deform_attn, inputs, grad_out) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))
    for got, want in zip(runs[0], default):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=1e-3 * want.abs().max().item())


def test_gpu_bad_kernel_name_is_a_clear_error():
    _needs_gpu()
    with pytest.raises(ValueError, match="DINO_DETR_MSDA_KERNEL='fastest'.*baseline, deterministic, vectorized"):
        force_kernel("fastest")
