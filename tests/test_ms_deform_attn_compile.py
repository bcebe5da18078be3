"""``torch.ops.dino_detr.ms_deform_attn`` under ``torch.compile(fullgraph=True)`` and
``torch.export``: the fake kernel and the autograd formula let both trace through
``MSDeformAttn`` without graph breaks, and the compiled results equal eager ones."""

import pytest
import torch

from dino_detr.layers import MSDeformAttn, native_extension_available

pytestmark = pytest.mark.skipif(not native_extension_available(), reason="dino_detr._C is not built")

SHAPES = [[6, 8], [3, 4], [2, 2], [1, 1]]


def _inputs(device="cpu"):
    torch.manual_seed(0)
    shapes = torch.tensor(SHAPES, device=device)
    sizes = shapes.prod(1)
    starts = torch.cumsum(sizes, 0) - sizes
    s = int(sizes.sum())
    query = torch.randn(2, 10, 32, device=device)
    value = torch.randn(2, s, 32, device=device)
    ref = torch.rand(2, 10, 4, 4, device=device)
    mask = torch.zeros(2, s, dtype=torch.bool, device=device)
    mask[1, -5:] = True
    return query, ref, value, shapes, starts, mask


def test_compile_fullgraph_forward_backward():
    module = MSDeformAttn(embed_dim=32, num_heads=4, num_levels=4, num_points=2)
    nn_inputs = _inputs()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    query = nn_inputs[0].clone().requires_grad_()
    out = compiled(query, *nn_inputs[1:])
    out.square().sum().backward()
    query_eager = nn_inputs[0].clone().requires_grad_()
    eager = module(query_eager, *nn_inputs[1:])
    eager.square().sum().backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(query.grad, query_eager.grad)


def test_compile_inductor_matches_eager():
    module = MSDeformAttn(embed_dim=32, num_heads=4, num_levels=4, num_points=2).eval()
    nn_inputs = _inputs()
    compiled = torch.compile(module, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*nn_inputs), module(*nn_inputs), rtol=1e-5, atol=1e-5)


def test_export_contains_the_native_op():
    module = MSDeformAttn(embed_dim=32, num_heads=4, num_levels=4, num_points=2).eval()
    nn_inputs = _inputs()
    exported = torch.export.export(module, nn_inputs)
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "dino_detr.ms_deform_attn.default" in targets
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(*nn_inputs), module(*nn_inputs))
