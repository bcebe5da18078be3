"""Deployment of DINO: ``torch.export``, AOTInductor packages and ONNX (see README, "Export")."""

from .exporter import (
    MAX_BATCH,
    SIZE_MULTIPLE,
    SIZE_RANGE,
    ExportError,
    check_image_size,
    compile_aoti,
    example_inputs,
    export_detector,
    export_onnx,
    op_library_path,
    save_program,
)
from .module import DetectorForExport
from .runtimes import BACKENDS, build_runtime, openvino_runtime

__all__ = [
    "BACKENDS",
    "build_runtime",
    "DetectorForExport",
    "ExportError",
    "MAX_BATCH",
    "SIZE_MULTIPLE",
    "SIZE_RANGE",
    "check_image_size",
    "compile_aoti",
    "example_inputs",
    "export_detector",
    "export_onnx",
    "op_library_path",
    "openvino_runtime",
    "save_program",
]
