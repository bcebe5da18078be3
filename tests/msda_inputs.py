"""Random inputs of multi-scale deformable attention, shared by the MSDA tests."""

import torch


def level_layout(shapes, device="cpu"):
    """(spatial_shapes (L, 2) int64, level_start_index (L,) int64, S) of levels ``shapes``."""
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device)
    sizes = spatial_shapes.prod(1)
    return spatial_shapes, torch.cumsum(sizes, 0) - sizes, int(sizes.sum())


def special_locations(spatial_shapes, num_values, generator, dtype):
    """(num_values, L, 2) normalized (x, y) on the hard spots of each level: exact borders
    (0, 1), pixel centres (i + 0.5) / W, pixel edges i / W, and just outside the map."""
    out = []
    for h, w in spatial_shapes.tolist():
        per_axis = []
        for size in (w, h):
            idx = torch.randint(0, size + 1, (num_values,), generator=generator).to(dtype)
            kind = torch.randint(0, 5, (num_values,), generator=generator)
            centre = (idx + 0.5) / size
            edge = idx / size
            border = (kind % 2).to(dtype)  # 0.0 or 1.0
            outside = torch.where(kind % 2 == 0, -0.6 / size, 1 + 0.6 / size).to(dtype)
            choice = torch.stack(
                [centre, edge, border, outside, torch.rand(num_values, generator=generator, dtype=dtype)]
            )
            per_axis.append(choice[kind, torch.arange(num_values)])
        out.append(torch.stack(per_axis, -1))
    return torch.stack(out, 1)


def make_inputs(
    batch, shapes, heads, channels, queries, points, dtype=torch.float64, device="cpu", seed=0, locations="mixed"
):
    """Random (value, spatial_shapes, level_start_index, sampling_locations, attention_weights).

    locations: "mixed" (uniform in [-0.3, 1.3] plus hard spots from ``special_locations``),
    or "smooth" (fractional pixel position in [0.2, 0.8]: away from the bilinear kinks, for
    finite differences; includes the half-outside border cells).
    """
    g = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index, spatial = level_layout(shapes)
    num_levels = len(shapes)
    loc_shape = (batch, queries, heads, num_levels, points, 2)
    value = torch.randn(batch, spatial, heads, channels, generator=g, dtype=dtype)
    weights = torch.rand(batch, queries, heads, num_levels, points, generator=g, dtype=dtype)
    if locations == "smooth":
        wh = spatial_shapes.flip(-1).to(dtype).view(1, 1, 1, num_levels, 1, 2)
        cell = torch.floor(torch.rand(loc_shape, generator=g, dtype=dtype) * (wh + 1)) - 1  # -1 .. W-1
        frac = 0.2 + 0.6 * torch.rand(loc_shape, generator=g, dtype=dtype)
        loc = (cell + frac + 0.5) / wh
    else:
        loc = torch.rand(loc_shape, generator=g, dtype=dtype) * 1.6 - 0.3
        count = batch * queries * heads * points
        special = special_locations(spatial_shapes, count, g, dtype)  # (count, L, 2)
        special = special.view(batch, queries, heads, points, num_levels, 2).transpose(3, 4)
        use_special = torch.rand(loc_shape[:-1] + (1,), generator=g) < 0.5
        loc = torch.where(use_special, special, loc)
    tensors = (value, spatial_shapes, level_start_index, loc, weights)
    return tuple(t.to(device) for t in tensors)


def random_case(seed):
    """(batch, shapes, heads, channels, queries, points) drawn over the ranges the op must cover."""
    g = torch.Generator().manual_seed(1000 + seed)

    def pick(options):
        return options[int(torch.randint(0, len(options), (1,), generator=g))]

    num_levels = pick([1, 5])
    shapes = [
        [int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))]
        for _ in range(num_levels)
    ]
    if num_levels > 1:
        shapes[-1] = [1, 1]
    return (
        pick([1, 2, 3]),
        shapes,
        pick([1, 2, 3, 8, 16]),
        pick([1, 3, 17, 33]),
        int(torch.randint(1, 12, (1,), generator=g)),
        pick([1, 2, 4, 8]),
    )


def naive_ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
    """Loop-by-loop multi-scale deformable attention written from the definition (slow; tiny inputs).

    Pixel (i, j) of a level has its centre at normalized ((j + 0.5) / W, (i + 0.5) / H);
    a sample interpolates bilinearly between the four surrounding centres, with zero
    outside the map. Returns (N, Lq, M * D).
    """
    n_batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    out = value.new_zeros(n_batch, queries, heads, channels)
    start = 0
    for l, (h, w) in enumerate(spatial_shapes.tolist()):
        level = value[:, start : start + h * w].reshape(n_batch, h, w, heads, channels)
        start += h * w
        for n in range(n_batch):
            for q in range(queries):
                for m in range(heads):
                    for p in range(points):
                        x = float(sampling_locations[n, q, m, l, p, 0]) * w - 0.5
                        y = float(sampling_locations[n, q, m, l, p, 1]) * h - 0.5
                        x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
                        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yy < h and 0 <= xx < w:
                                corner = (1 - abs(x - xx)) * (1 - abs(y - yy))
                                out[n, q, m] += attention_weights[n, q, m, l, p] * corner * level[n, yy, xx, m]
    return out.flatten(2)


def float32_tolerances(inputs, grad_out):
    """Per-element bounds on how far two float32 evaluations of the op (any summation order, with
    or without FMA) may differ, for (output, grad_value, grad_sampling_locations,
    grad_attention_weights), from float32's unit roundoff u = 2**-24.

    Each quantity is a sum of products; a float32 sum of k terms is within k * u * sum|terms| of
    the exact one, and the corner weights are within 2 * max(H, W) * u of theirs (the pixel
    coordinate loc * W - 0.5 rounds at magnitude W). With V = max |value| over the head's
    positions, G = sum_d |grad_out| and a the attention weights:
      output       sum_{l,p} a * V                            (k = 4 L P)
      grad_value   sum_{q,l,p} a * |grad_out|                 (k = Lq L P)
      grad_loc     2 * a * W (or H) * G * V                   (k = D)
      grad_attn    G * V                                      (k = D)
    each scaled by 2 (k + 8 + 2 max(H, W)) u for two evaluations.
    """
    value, spatial_shapes, _, locations, weights = (t.detach().double() if t.is_floating_point() else t for t in inputs)
    n, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = locations.shape
    u = 2.0**-24
    widest = int(spatial_shapes.max())
    slack = 8 + 2 * widest

    def scale(k):
        return 2 * (k + slack) * u

    v_max = value.abs().amax(1)  # (N, M, D)
    attn = weights.abs()
    g = grad_out.detach().double().abs().view(n, queries, heads, channels)
    g_sum = g.sum(-1)  # (N, Lq, M)
    out = (attn.sum((-1, -2))[..., None] * v_max[:, None]).flatten(2) * scale(4 * levels * points)
    grad_value = (attn.sum((-1, -2))[..., None] * g).sum(1)[:, None] * scale(queries * levels * points)  # (N, 1, M, D)
    size_xy = spatial_shapes.flip(-1).double().view(1, 1, 1, levels, 1, 2)  # (W, H)
    head_mag = (g_sum[..., None] * v_max[:, None]).amax(-1)  # (N, Lq, M): max over d of G * V
    grad_loc = 2 * attn[..., None] * size_xy * head_mag[..., None, None, None] * scale(channels)
    grad_attn = head_mag[..., None, None].expand_as(attn) * scale(channels)
    return out, grad_value.expand_as(value), grad_loc, grad_attn
