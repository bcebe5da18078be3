"""Multi-scale deformable attention: the public op.

``ms_deform_attn`` makes its inputs contiguous and calls the native operator
``torch.ops.dino_detr.ms_deform_attn`` (schema in ``dino_detr/csrc``; C++ kernel on
the CPU, CUDA kernels on the GPU). Its autograd formula and fake (meta) kernel are
registered here through ``torch.library``, so ``torch.compile(fullgraph=True)`` and
``torch.export`` trace through it without graph breaks.

Input checks live in C++ (``check_ms_deform_attn_inputs`` in ``dino_detr/csrc/ms_deform_attn.h``
and the level layout in the kernels): a ``ValueError`` for a bad shape, device or layout, a
``TypeError`` for a bad dtype. Python repeats them only where no C++ runs: in the fake kernel
(at trace time) and before the reference fallback.

On the GPU, each call runs the kernel variant chosen by measurement for its shape
(``ms_deform_attn_kernels.py``; ``DINO_DETR_MSDA_KERNEL`` forces one).

When the extension ``dino_detr._C`` is not built, the op falls back to the
pure-PyTorch reference (``grid_sample``) and says so once.
"""

import contextlib
import warnings
from typing import Iterator

import torch

from .cuda_arch import check_kernel_image
from .ms_deform_attn_kernels import run_selected
from .ms_deform_attn_reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "native_extension_available", "use_reference_implementation"]

_BUILD_HINT = "build it with `pip install --no-build-isolation -e .` from the repository root"

try:
    from dino_detr import _C  # noqa: F401  (loading it registers torch.ops.dino_detr.*)

    _NATIVE_IMPORT_ERROR = None
except ImportError as e:  # the extension is not built: fall back to the reference
    _NATIVE_IMPORT_ERROR = e
    warnings.warn(
        "dino_detr._C (native multi-scale deformable attention) is not available "
        f"({e}); falling back to the slow pure-PyTorch reference. To use the native op, "
        f"{_BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )

_INPUT_NAMES = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def native_extension_available() -> bool:
    """True when ``dino_detr._C`` is built and ``torch.ops.dino_detr.ms_deform_attn`` is the native op."""
    return _NATIVE_IMPORT_ERROR is None


_force_reference = False


@contextlib.contextmanager
def use_reference_implementation(enabled: bool = True) -> Iterator[None]:
    """Within this context, :func:`ms_deform_attn` runs the pure-PyTorch reference even when the
    native op is built: e.g. to measure what the native op saves inside a whole model
    (``tools/benchmark.py --compare-reference``). Not thread-safe; nests."""
    global _force_reference
    previous, _force_reference = _force_reference, enabled
    try:
        yield
    finally:
        _force_reference = previous


def _check_metadata(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Checks ranks, sizes, dtypes and devices (no data access; safe under torch.compile).

    The checks of the C++ op (``check_ms_deform_attn_inputs``), with its errors, for where no C++
    runs: the fake kernel and the reference fallback.
    """
    tensors = dict(zip(_INPUT_NAMES, (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)))
    expected_ranks = {
        "value": (4, "(N, S, M, D)"),
        "spatial_shapes": (2, "(L, 2)"),
        "level_start_index": (1, "(L,)"),
        "sampling_locations": (6, "(N, Lq, M, L, P, 2)"),
        "attention_weights": (5, "(N, Lq, M, L, P)"),
    }
    for name, (rank, layout) in expected_ranks.items():
        if tensors[name].dim() != rank:
            raise ValueError(
                f"ms_deform_attn: {name} must have rank {rank} {layout}, got shape {list(tensors[name].shape)}"
            )
    if spatial_shapes.shape[1] != 2:
        raise ValueError(f"ms_deform_attn: spatial_shapes must be (L, 2) of (H, W), got {list(spatial_shapes.shape)}")
    if sampling_locations.shape[-1] != 2:
        raise ValueError(
            "ms_deform_attn: sampling_locations must end in 2 normalized (x, y) coordinates, "
            f"got shape {list(sampling_locations.shape)}"
        )
    n, _, m, _ = value.shape
    num_levels = spatial_shapes.shape[0]
    checks = [
        ("batch size", "value", n, "sampling_locations", sampling_locations.shape[0]),
        ("batch size", "value", n, "attention_weights", attention_weights.shape[0]),
        ("head count", "value", m, "sampling_locations", sampling_locations.shape[2]),
        ("head count", "value", m, "attention_weights", attention_weights.shape[2]),
        ("level count", "spatial_shapes", num_levels, "level_start_index", level_start_index.shape[0]),
        ("level count", "spatial_shapes", num_levels, "sampling_locations", sampling_locations.shape[3]),
        ("level count", "spatial_shapes", num_levels, "attention_weights", attention_weights.shape[3]),
        (
            "query count",
            "sampling_locations",
            sampling_locations.shape[1],
            "attention_weights",
            attention_weights.shape[1],
        ),
        (
            "point count",
            "sampling_locations",
            sampling_locations.shape[4],
            "attention_weights",
            attention_weights.shape[4],
        ),
    ]
    for what, name_a, a, name_b, b in checks:
        if a != b:
            raise ValueError(f"ms_deform_attn: {what} mismatch: {name_a} has {a}, {name_b} has {b}")
    for name, t in tensors.items():
        if t.device != value.device:
            raise ValueError(
                f"ms_deform_attn: all inputs must be on one device; value is on {value.device}, {name} is on {t.device}"
            )
    for name in ("value", "sampling_locations", "attention_weights"):
        if tensors[name].dtype not in _FLOAT_DTYPES:
            raise TypeError(f"ms_deform_attn: {name} must be a floating-point tensor, got {tensors[name].dtype}")
    half_value = value.dtype in (torch.float16, torch.bfloat16)
    for name in ("sampling_locations", "attention_weights"):
        dtype = tensors[name].dtype
        if dtype != value.dtype and not (half_value and dtype == torch.float32):
            raise TypeError(
                f"ms_deform_attn: mixed float dtypes: value is {value.dtype}, {name} is {dtype}; "
                "use value's dtype (or float32 locations and weights with a float16/bfloat16 value)"
            )
    if sampling_locations.dtype != attention_weights.dtype:
        raise TypeError(
            f"ms_deform_attn: mixed float dtypes: sampling_locations is {sampling_locations.dtype}, "
            f"attention_weights is {attention_weights.dtype}; use one dtype for both"
        )
    for name in ("spatial_shapes", "level_start_index"):
        if tensors[name].dtype != torch.int64:
            raise TypeError(f"ms_deform_attn: {name} must be int64, got {tensors[name].dtype}")


def _check_level_layout(value, spatial_shapes, level_start_index):
    """Checks that the levels tile ``value``'s S axis in order, for the reference fallback (the
    native kernels check the layout themselves: the CPU kernel on the host, the CUDA kernels on the device).

    Sizes are Python integers, so a layout whose ``H * W`` wraps around int64 cannot pass.
    """
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    if any(h < 1 or w < 1 for h, w in shapes):
        raise ValueError(f"ms_deform_attn: spatial_shapes must be positive (H, W), got {shapes}")
    expected = [sum(h * w for h, w in shapes[:level]) for level in range(len(shapes))]
    total = sum(h * w for h, w in shapes)
    if total != value.shape[1]:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes {shapes} sum to {total} positions but value has S={value.shape[1]}"
        )
    if starts != expected:
        raise ValueError(
            f"ms_deform_attn: level_start_index {starts} is inconsistent with spatial_shapes (expected {expected})"
        )


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention (Deformable DETR semantics).

    Bilinear sampling with ``align_corners=False`` (pixel centres at ``(i + 0.5) / W``),
    zeros outside each map, weighted by ``attention_weights`` and summed over levels and points.

    Args:
        value: (N, S, M, D) float, S = sum_l H_l * W_l (levels flattened row-major, in order).
        spatial_shapes: (L, 2) int64 ``(H_l, W_l)``.
        level_start_index: (L,) int64 start of each level in S.
        sampling_locations: (N, Lq, M, L, P, 2) normalized ``(x, y)``, ``value``'s dtype, or float32
            with a float16/bfloat16 ``value``, so that locations keep full precision (the CPU kernel has
            a forward only for a float16/bfloat16 ``value``).
        attention_weights: (N, Lq, M, L, P), the dtype of ``sampling_locations``.

    Returns:
        (N, Lq, M * D) with ``value``'s dtype.

    Raises:
        ValueError: for a bad shape, device or level layout (naming the tensor and what was expected).
        TypeError: for a bad dtype or an argument that is not a tensor.
    """
    inputs = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    for name, t in zip(_INPUT_NAMES, inputs):  # the schema would say so too, but as a RuntimeError
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ms_deform_attn: {name} must be a torch.Tensor, got {type(t).__name__}")
    args = tuple(t.contiguous() for t in inputs)
    if _NATIVE_IMPORT_ERROR is None and not _force_reference:
        check_kernel_image(value.device)  # one clear error when the build has no image for this GPU
        op = torch.ops.dino_detr.ms_deform_attn  # checks its inputs (C++, or the fake kernel)
        return run_selected("forward", op, args, args[0], args[3]) if value.is_cuda else op(*args)
    _check_metadata(*args)
    if not torch.compiler.is_compiling():
        _check_level_layout(*args[:3])  # the reference reads the layout anyway
    return ms_deform_attn_reference(*args)


if _NATIVE_IMPORT_ERROR is None:

    @torch.library.register_fake("dino_detr::ms_deform_attn")
    def _ms_deform_attn_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        _check_metadata(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        n, _, m, d = value.shape
        return value.new_empty((n, sampling_locations.shape[1], m * d))

    @torch.library.register_fake("dino_detr::ms_deform_attn_backward")
    def _ms_deform_attn_backward_fake(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    ):
        return (
            torch.empty_like(value),
            torch.empty_like(sampling_locations),
            torch.empty_like(attention_weights),
        )

    def _setup_context(ctx, inputs, output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    def _backward(ctx, grad_output):
        inputs = (grad_output.contiguous(), *ctx.saved_tensors)
        op = torch.ops.dino_detr.ms_deform_attn_backward
        if inputs[1].is_cuda:
            grad_value, grad_locations, grad_weights = run_selected("backward", op, inputs, inputs[1], inputs[4])
        else:
            grad_value, grad_locations, grad_weights = op(*inputs)
        return grad_value, None, None, grad_locations, grad_weights

    torch.library.register_autograd("dino_detr::ms_deform_attn", _backward, setup_context=_setup_context)
