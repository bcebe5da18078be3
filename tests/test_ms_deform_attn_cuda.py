"""CUDA kernels of multi-scale deformable attention (skipped without a GPU): reference
agreement, gradients, fp16/bf16 against fp32, CPU/CUDA agreement, odd batch sizes."""

import pytest
import torch

from dino_detr.layers import ms_deform_attn, ms_deform_attn_reference, native_extension_available
from msda_inputs import make_inputs, random_case

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and native_extension_available()), reason="needs a GPU and dino_detr._C"
)


def _grads(fn, inputs, grad_out):
    inputs = tuple(t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in inputs)
    return torch.autograd.grad(fn(*inputs), (inputs[0], inputs[3], inputs[4]), grad_out)


@pytest.mark.parametrize("seed", range(12))
def test_cuda_forward_backward_match_reference_float64(seed):
    batch, shapes, heads, channels, queries, points = random_case(seed)
    inputs = make_inputs(batch, shapes, heads, channels, queries, points, seed=seed, device="cuda",
                         locations="smooth")
    torch.testing.assert_close(ms_deform_attn(*inputs), ms_deform_attn_reference(*inputs), rtol=1e-9, atol=1e-9)
    grad_out = torch.randn(batch, queries, heads * channels, dtype=torch.float64, device="cuda")
    for native, ref in zip(_grads(ms_deform_attn, inputs, grad_out), _grads(ms_deform_attn_reference, inputs, grad_out)):
        torch.testing.assert_close(native, ref, rtol=1e-8, atol=1e-8)


def test_cuda_gradcheck():
    inputs = make_inputs(2, [[4, 3], [2, 2], [1, 1]], 3, 2, 3, 3, seed=7, device="cuda", locations="smooth")
    inputs = tuple(t.requires_grad_() if t.is_floating_point() else t for t in inputs)
    assert torch.autograd.gradcheck(ms_deform_attn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3, 5, 7])
def test_cpu_and_cuda_agree_float32(batch):
    """DINO-like shapes, batch sizes that no im2col step divides."""
    inputs = make_inputs(batch, [[20, 30], [10, 15], [5, 8], [3, 4]], 8, 32, 50, 4, dtype=torch.float32, seed=batch)
    cpu = ms_deform_attn(*inputs)
    gpu = ms_deform_attn(*(t.cuda() for t in inputs))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(cpu)
    for c, g in zip(_grads(ms_deform_attn, inputs, grad_out),
                    _grads(ms_deform_attn, tuple(t.cuda() for t in inputs), grad_out.cuda())):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_against_float32(dtype, tol):
    inputs = make_inputs(2, [[20, 30], [10, 15], [5, 8], [3, 4]], 8, 32, 40, 4, dtype=torch.float32, device="cuda",
                         seed=3, locations="smooth")
    full = ms_deform_attn(*inputs)
    half = ms_deform_attn(*(t.to(dtype) if t.is_floating_point() else t for t in inputs))
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), full, rtol=tol, atol=tol)
    grad_out = torch.randn_like(full)
    half_inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    for h, f in zip(_grads(ms_deform_attn, half_inputs, grad_out.to(dtype)), _grads(ms_deform_attn, inputs, grad_out)):
        assert h.dtype == dtype and torch.isfinite(h).all()
        scale = f.abs().max().clamp(min=1)
        assert ((h.float() - f).abs().max() / scale) < 10 * tol


def test_cuda_rejects_mixed_devices():
    value, shapes, starts, loc, weights = make_inputs(1, [[3, 4]], 2, 4, 5, 2, dtype=torch.float32, device="cuda")
    with pytest.raises(ValueError, match="one device"):
        ms_deform_attn(value, shapes.cpu(), starts, loc, weights)
