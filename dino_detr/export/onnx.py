"""ONNX form of ``dino_detr::ms_deform_attn``: the standard ``GridSample`` operator, one per level.

Used as a ``custom_translation_table`` entry of ``torch.onnx.export(dynamo=True)``, so the
exported file needs no custom operator: any ONNX runtime with opset >= 16 runs it. The
semantics are those of the native op (bilinear, zeros outside the map, ``align_corners=0``),
the same formulation as :func:`dino_detr.layers.ms_deform_attn_reference`.
"""

from onnxscript import opset18 as op

__all__ = ["ONNX_OPSET", "ms_deform_attn_onnx"]

ONNX_OPSET = 18


def _ints(*values):
    return op.Constant(value_ints=list(values))


def ms_deform_attn_onnx(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Traced by onnxscript (inputs are graph values, the loop over levels is unrolled).

    Args (shapes as in :func:`dino_detr.layers.ms_deform_attn`):
        value (N, S, M, D); spatial_shapes (L, 2) int64; level_start_index (L,) int64;
        sampling_locations (N, Lq, M, L, P, 2); attention_weights (N, Lq, M, L, P).
        M, D, L and P must be static (they are: they come from the model's config).
    Returns:
        (N, Lq, M * D)
    """
    _, _, num_heads, head_dim = value.shape
    num_levels, num_points = sampling_locations.shape[3], sampling_locations.shape[4]
    batch = op.Shape(value, start=0, end=1)
    num_queries = op.Shape(sampling_locations, start=1, end=2)
    # (N, Lq, M, L, P, 2) in [0, 1] -> (N, M, Lq, L, P, 2) in [-1, 1], GridSample's convention.
    grids = op.Transpose(
        op.Sub(op.Mul(sampling_locations, op.Constant(value_float=2.0)), op.Constant(value_float=1.0)),
        perm=[0, 2, 1, 3, 4, 5],
    )
    grid_shape = op.Concat(_ints(-1), num_queries, _ints(num_points, 2), axis=0)
    sampled = []
    for level in range(num_levels):
        height = op.Slice(spatial_shapes, _ints(level, 0), _ints(level + 1, 1), _ints(0, 1))
        width = op.Slice(spatial_shapes, _ints(level, 1), _ints(level + 1, 2), _ints(0, 1))
        start = op.Slice(level_start_index, _ints(level), _ints(level + 1), _ints(0))
        end = op.Add(start, op.Mul(op.Reshape(height, _ints(1)), op.Reshape(width, _ints(1))))
        # (N, H*W, M, D) -> (N*M, D, H, W)
        level_value = op.Transpose(op.Slice(value, start, end, _ints(1)), perm=[0, 2, 3, 1])
        level_value = op.Reshape(
            level_value,
            op.Concat(_ints(-1, head_dim), op.Reshape(height, _ints(1)), op.Reshape(width, _ints(1)), axis=0),
        )
        # (N, M, Lq, P, 2) -> (N*M, Lq, P, 2)
        grid = op.Reshape(op.Gather(grids, op.Constant(value_int=level), axis=3), grid_shape)
        sampled.append(op.GridSample(level_value, grid, mode="bilinear", padding_mode="zeros", align_corners=0))
    sampled = op.Concat(*sampled, axis=-1)  # (N*M, D, Lq, L*P)
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
    weights = op.Reshape(
        op.Transpose(attention_weights, perm=[0, 2, 1, 3, 4]),
        op.Concat(_ints(-1, 1), num_queries, _ints(num_levels * num_points), axis=0),
    )
    out = op.ReduceSum(op.Mul(sampled, weights), _ints(-1), keepdims=0)  # (N*M, D, Lq)
    out = op.Reshape(out, op.Concat(batch, _ints(num_heads * head_dim, -1), axis=0))
    return op.Transpose(out, perm=[0, 2, 1])
