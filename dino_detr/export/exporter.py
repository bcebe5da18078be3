"""Export of the DINO inference path: ``torch.export``, AOTInductor and ONNX.

All three start from one :class:`torch.export.ExportedProgram` of :class:`DetectorForExport`
with the batch size, height and width dynamic. Height and width are multiples of
``SIZE_MULTIPLE`` (the backbone's total stride, so every level's size is an exact division)
within ``SIZE_RANGE``: 320 keeps more encoder tokens than the 900 queries of the COCO
configs need (2125 at 320x320 with 4 levels), 1344 is Detectron2's test resize of COCO
(``MAX_SIZE_TEST`` 1333) padded to a multiple of 32.
"""

import glob
import os
from typing import Sequence, Tuple

import torch
from torch.export import Dim, ExportedProgram

from dino_detr.modeling.meta_arch import DinoDetr

from .module import DetectorForExport

__all__ = [
    "SIZE_MULTIPLE",
    "SIZE_RANGE",
    "MAX_BATCH",
    "ExportError",
    "check_image_size",
    "example_inputs",
    "export_detector",
    "save_program",
    "compile_aoti",
    "export_onnx",
    "op_library_path",
]

SIZE_MULTIPLE = 32
SIZE_RANGE = (320, 1344)
MAX_BATCH = 16


class ExportError(RuntimeError):
    """The model (or a part of it, named in the message) cannot be exported."""


def check_image_size(height: int, width: int, size_range: Sequence[int] = SIZE_RANGE):
    """Raise ``ValueError`` unless both sides are multiples of 32 within ``size_range``."""
    low, high = size_range
    for name, side in (("height", height), ("width", width)):
        if side % SIZE_MULTIPLE or not low <= side <= high:
            raise ValueError(
                f"image {name} {side} is outside the exported sizes: multiples of {SIZE_MULTIPLE} in "
                f"[{low}, {high}]; resize, then zero-pad the normalized image to such a size"
            )


def example_inputs(height: int, width: int, batch: int = 2, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random normalized ``images`` (batch, 3, H, W) and their ``image_sizes`` (batch, 2): the
    first image fills the batch, the others are smaller by up to 31 pixels (zero padding)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=g)
    sizes = torch.tensor([[height, width]] * batch)
    sizes[1:] -= torch.randint(0, SIZE_MULTIPLE, (batch - 1, 2), generator=g)
    for image, (h, w) in zip(images, sizes.tolist()):
        image[:, h:] = 0
        image[:, :, w:] = 0
    return images, sizes


def _dynamic_shapes(size_range):
    low, high = (s // SIZE_MULTIPLE for s in size_range)
    batch = Dim("batch", min=1, max=MAX_BATCH)
    height, width = Dim("height_32", min=low, max=high), Dim("width_32", min=low, max=high)
    return {"images": {0: batch, 2: SIZE_MULTIPLE * height, 3: SIZE_MULTIPLE * width}, "image_sizes": {0: batch}}


def export_detector(
    model: DinoDetr, example_size: Tuple[int, int] = (800, 1216), size_range: Sequence[int] = SIZE_RANGE
) -> ExportedProgram:
    """``torch.export`` of ``DetectorForExport(model)`` on the CPU, batch size 1 to ``MAX_BATCH``
    and H, W any multiple of 32 in ``size_range``. The graph keeps ``dino_detr.ms_deform_attn``
    as one node per attention.

    Raises:
        ValueError: ``example_size`` outside ``size_range``.
        ExportError: the backbone (or, if it exports alone, the rest of the model) cannot be exported.
    """
    check_image_size(*example_size, size_range=size_range)
    if model.device.type != "cpu":
        raise ValueError(f"export_detector: export on the CPU (MODEL.DEVICE cpu); the model is on {model.device}")
    module = DetectorForExport(model)
    inputs = example_inputs(*example_size)
    shapes = _dynamic_shapes(size_range)
    with torch.no_grad():
        try:
            return torch.export.export(module, inputs, dynamic_shapes=shapes)
        except Exception as e:
            _raise_for_backbone(model.backbone, inputs[0], shapes["images"], e)
            raise ExportError(f"DinoDetr cannot be exported ({type(e).__name__}): {e}") from e


def _raise_for_backbone(backbone, images, image_shapes, error):
    """Re-raise ``error`` naming the backbone when the backbone alone does not export."""
    try:
        torch.export.export(backbone, (images,), dynamic_shapes=(image_shapes,))
    except Exception as backbone_error:
        raise ExportError(
            f"the backbone {type(backbone).__name__} (MODEL.BACKBONE.NAME) cannot be exported with dynamic image "
            f"sizes, so neither can DinoDetr; use an exportable backbone such as build_resnet_backbone. "
            f"torch.export said: {type(backbone_error).__name__}: {str(backbone_error).splitlines()[0]}"
        ) from error


def save_program(program: ExportedProgram, path: str) -> str:
    """``torch.export.save``; load with ``torch.export.load(path).module()`` after importing
    ``dino_detr`` (or loading the op library, see :func:`op_library_path`)."""
    torch.export.save(program, path)
    return str(path)


def compile_aoti(program: ExportedProgram, path: str, optimize: bool = True) -> str:
    """AOTInductor package (``.pt2``) of ``program`` for this machine's CPU. A process runs it with
    ``torch._inductor.aoti_load_package(path)`` after ``torch.ops.load_library(op_library_path())``;
    with ``AOTI_RUNTIME_CHECK_INPUTS=1`` it also checks the input sizes against the upper ends of the
    exported ranges.
    ``optimize=False`` compiles the C++ with ``-O0`` (several times faster to build, slower to run)."""
    # check_lowerbound off: the runtime check would otherwise reject batch size 1 (it wants >= 2).
    configs = {"aot_inductor.check_lowerbound": False}
    if not optimize:
        configs["aot_inductor.debug_compile"] = True
    return torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)


def export_onnx(program: ExportedProgram, path: str) -> str:
    """ONNX file (opset ``ONNX_OPSET``) with inputs ``images``, ``image_sizes`` and outputs ``boxes``,
    ``scores``, ``classes``; the deformable attention is standard ``GridSample`` (see
    :mod:`dino_detr.export.onnx`), so any ONNX runtime runs it."""
    from .onnx import ONNX_OPSET, ms_deform_attn_onnx

    torch.onnx.export(
        program,
        program.example_inputs[0],
        path,
        dynamo=True,
        opset_version=ONNX_OPSET,
        custom_translation_table={torch.ops.dino_detr.ms_deform_attn.default: ms_deform_attn_onnx},
        input_names=["images", "image_sizes"],
        output_names=["boxes", "scores", "classes"],
    )
    return str(path)


def op_library_path() -> str:
    """Path of the built ``dino_detr._C`` library, which registers ``torch.ops.dino_detr.*``."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd"))
    if not found:
        raise FileNotFoundError(
            f"dino_detr._C is not built (no _C*.so in {here}); build it with "
            "`pip install --no-build-isolation -e .` from the repository root"
        )
    return found[0]
