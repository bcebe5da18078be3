"""The exported detector on each CPU runtime, behind one call ``(images, image_sizes) -> outputs``:
eager PyTorch, ``torch.compile``, an AOTInductor package and ONNX Runtime (for benchmarks and
checks against eager)."""

import os
from typing import Callable, Dict

import torch

from .exporter import compile_aoti, export_detector, export_onnx
from .module import DetectorForExport

__all__ = ["BACKENDS", "build_runtime"]

BACKENDS = ("eager", "compiled", "aoti", "onnxruntime")


def build_runtime(backend: str, model, example_size, workdir: str) -> Callable:
    """A function ``(images, image_sizes) -> (boxes, scores, classes)`` as torch tensors.

    Args:
        backend: one of ``BACKENDS``; "aoti" and "onnxruntime" export ``model`` at
            ``example_size`` and write their artefact into ``workdir``.
    """
    detector = DetectorForExport(model)
    if backend == "eager":
        return detector
    if backend == "compiled":
        return torch.compile(detector, dynamic=True)
    if backend == "aoti":
        path = compile_aoti(export_detector(model, example_size), os.path.join(workdir, "dino_aoti.pt2"))
        return torch._inductor.aoti_load_package(path)
    if backend == "onnxruntime":
        import onnxruntime

        path = export_onnx(export_detector(model, example_size), os.path.join(workdir, "dino.onnx"))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

        def run(images, image_sizes):
            feed: Dict = {"images": images.numpy(), "image_sizes": image_sizes.numpy()}
            return tuple(torch.from_numpy(o) for o in session.run(["boxes", "scores", "classes"], feed))

        return run
    raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
