"""Hostile level layouts against every entry point of multi-scale deformable attention (run in a
subprocess by test_ms_deform_attn.py, so that a crash fails the test instead of killing pytest).

Each layout, random or extreme (sizes that wrap around 2**64 and so "sum to S", negative and zero
sizes, starts off by one), goes through ``dino_detr.layers.ms_deform_attn`` (forward and
backward), ``torch.ops.dino_detr.ms_deform_attn`` and ``ms_deform_attn_backward`` directly, and
the emulated CUDA kernels when a library path is given. Every call must either raise a clear
error or return finite results of the right shape. Prints the number of layouts and rejections.

    python tests/msda_layout_fuzz.py SEED COUNT [EMULATION_LIBRARY]
"""

import sys

import torch

from dino_detr.layers import ms_deform_attn

EXTREMES = [
    ([[2**62 + 1, 4]], None, 4),
    ([[2**32, 2**32], [2, 2]], None, 4),
    ([[2, 2], [2**32, 2**32]], None, 4),
    ([[2**63 - 1, 1]], None, 4),
    ([[-(2**63), -1]], None, 4),
    ([[2**31, 2**33], [1, 4]], [0, 0], 4),
    ([[3, 4], [0, 2]], [0, 12], 12),
    ([[3, 4], [-2, -2]], [0, 12], 16),
    ([[3, 4], [2, 2]], [0, 13], 16),
    ([[3, 4], [2, 2]], [0, 12], 14),
    ([[1, 1]], [-1], 1),
]
SIZES = [1, 2, 3, 5, 0, -1, -4, 2**31, 2**32, 2**32 + 1, 2**62 + 1, 2**63 - 1, -(2**63)]


def random_layout(g):
    levels = int(torch.randint(1, 5, (1,), generator=g))
    shapes = torch.tensor(
        [[SIZES[int(i)] for i in torch.randint(0, len(SIZES), (2,), generator=g)] for _ in range(levels)],
        dtype=torch.int64,
    )
    sizes = shapes.prod(1)  # int64: wraps around like a C++ check would
    starts = torch.cumsum(sizes, 0) - sizes
    if torch.rand(1, generator=g) < 0.3:
        starts = starts + torch.randint(-1, 2, (levels,), generator=g)
    total = int(sizes.sum())
    spatial = total if 0 <= total <= 64 else int(torch.randint(1, 33, (1,), generator=g))
    return shapes.tolist(), starts.tolist(), spatial


def entry_points(emulation):
    def layer(*inputs):
        inputs = tuple(t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs)
        out = ms_deform_attn(*inputs)
        out.sum().backward()
        return (out,) + tuple(t.grad for t in inputs if t.is_floating_point())

    def op_forward(*inputs):
        return (torch.ops.dino_detr.ms_deform_attn(*inputs),)

    def op_backward(*inputs):
        grad = torch.ones(
            inputs[0].shape[0], inputs[3].shape[1], inputs[0].shape[2] * inputs[0].shape[3], dtype=inputs[0].dtype
        )
        return torch.ops.dino_detr.ms_deform_attn_backward(grad, *inputs)

    points = {
        "dino_detr.layers.ms_deform_attn": layer,
        "torch.ops.dino_detr.ms_deform_attn": op_forward,
        "torch.ops.dino_detr.ms_deform_attn_backward": op_backward,
    }
    if emulation is not None:
        points["emulated CUDA forward"] = lambda *inputs: (emulation.forward(*inputs),)
        points["emulated CUDA backward"] = lambda *inputs: emulation.backward(
            torch.ones(
                inputs[0].shape[0], inputs[3].shape[1], inputs[0].shape[2] * inputs[0].shape[3], dtype=inputs[0].dtype
            ),
            *inputs,
        )
    return points


def main(seed, count, library=None):
    g = torch.Generator().manual_seed(seed)
    emulation = None
    if library:
        sys.path.insert(0, "tests")
        from cuda_emulation.msda_emu import EmulatedCuda

        emulation = EmulatedCuda(library)
    points = entry_points(emulation)
    layouts = [(s, st if st is not None else None, n) for s, st, n in EXTREMES]
    layouts += [random_layout(g) for _ in range(count)]
    calls = rejected = 0
    for shapes, starts, spatial in layouts:
        shapes_t = torch.tensor(shapes, dtype=torch.int64)
        if starts is None:
            sizes = shapes_t.prod(1)
            starts_t = torch.cumsum(sizes, 0) - sizes
        else:
            starts_t = torch.tensor(starts, dtype=torch.int64)
        levels = len(shapes)
        value = torch.randn(1, spatial, 2, 3, generator=g)
        loc = torch.rand(1, 3, 2, levels, 2, 2, generator=g) * 2 - 0.5
        weights = torch.rand(1, 3, 2, levels, 2, generator=g)
        for name, fn in points.items():
            calls += 1
            try:
                results = fn(value, shapes_t, starts_t, loc, weights)
            except (ValueError, TypeError, RuntimeError):
                rejected += 1
                continue
            for r in results:
                assert torch.isfinite(r).all(), f"{name}: non-finite result for layout {shapes}, {starts_t.tolist()}"
    print(f"{len(layouts)} layouts, {calls} calls, {rejected} rejected")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
