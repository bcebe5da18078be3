"""The exported detector on each CPU runtime, behind one call ``(images, image_sizes) -> outputs``:
eager PyTorch, ``torch.compile``, an AOTInductor package, ONNX Runtime and OpenVINO (for benchmarks
and checks against eager). A ``-bf16`` backend runs a bfloat16 copy of the model
(:meth:`DinoDetr.prepare_for_inference`); OpenVINO's ``-f32`` / ``-bf16`` set its inference precision hint
on this project's ONNX export."""

import copy
import os
from typing import Callable, Dict

import torch

from .exporter import compile_aoti, export_detector, export_onnx
from .module import DetectorForExport

__all__ = ["BACKENDS", "build_runtime", "openvino_runtime"]

BACKENDS = ("eager", "eager-bf16", "compiled", "aoti", "aoti-bf16", "onnxruntime", "openvino-f32", "openvino-bf16")


def _onnx_file(model, example_size, workdir: str) -> str:
    """This project's ONNX export of ``model`` at ``example_size`` in ``workdir`` (one model per workdir),
    exported once and shared by the ONNX runtimes."""
    path = os.path.join(workdir, "dino_{}x{}.onnx".format(*example_size))
    if not os.path.exists(path):
        export_onnx(export_detector(model, example_size), path)
    return path


def build_runtime(backend: str, model, example_size, workdir: str) -> Callable:
    """A function ``(images, image_sizes) -> (boxes, scores, classes)`` as torch tensors.

    Args:
        backend: one of ``BACKENDS``; "aoti", "onnxruntime" and "openvino" export ``model`` at
            ``example_size`` and write their artefact into ``workdir``; "-bf16" runs a copy of ``model``
            prepared for bfloat16 inference (``model`` itself is unchanged).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    artefact = os.path.join(workdir, f"dino_{backend}.pt2")
    if backend.endswith("-bf16") and not backend.startswith("openvino"):
        model = copy.deepcopy(model).prepare_for_inference(torch.bfloat16)
        backend = backend.removesuffix("-bf16")
    detector = DetectorForExport(model)
    if backend == "eager":
        return detector
    if backend == "compiled":
        return torch.compile(detector, dynamic=True)
    if backend == "aoti":
        path = compile_aoti(export_detector(model, example_size), artefact)
        return torch._inductor.aoti_load_package(path)
    if backend.startswith("openvino-"):
        return openvino_runtime(_onnx_file(model, example_size, workdir), backend.removeprefix("openvino-"))
    if backend == "onnxruntime":
        import onnxruntime

        path = _onnx_file(model, example_size, workdir)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

        def run(images, image_sizes):
            feed: Dict = {"images": images.numpy(), "image_sizes": image_sizes.numpy()}
            return tuple(torch.from_numpy(o) for o in session.run(["boxes", "scores", "classes"], feed))

        return run
    raise AssertionError(f"backend {backend!r} is listed in BACKENDS but not built here")


def openvino_runtime(onnx_path: str, precision: str) -> Callable:
    """OpenVINO (CPU plugin) running this project's ONNX export with the inference precision hint
    ``precision`` ("f32" or "bf16"), ``torch.get_num_threads()`` threads, latency mode."""
    import openvino

    compiled = openvino.Core().compile_model(
        onnx_path,
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY",
        },
    )
    request = compiled.create_infer_request()

    def run(images, image_sizes):
        results = request.infer({"images": images.numpy(), "image_sizes": image_sizes.numpy()})
        return tuple(torch.from_numpy(results[compiled.output(name)].copy()) for name in ("boxes", "scores", "classes"))

    return run
