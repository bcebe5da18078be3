"""Builds the `dino_detr` package and its native extension `dino_detr._C`.

The C++ CPU kernels are always built. The CUDA kernels are added when CUDA is usable
(torch sees a GPU and CUDA_HOME is found) or when FORCE_CUDA=1 (e.g. CI without a GPU,
so that the kernels are at least compiled). TORCH_CUDA_ARCH_LIST picks the GPU
architectures (default "8.0;8.6;9.0").

    pip install --no-build-isolation --no-deps -e .
"""

import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

CSRC = os.path.join("dino_detr", "csrc")


def _with_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.cuda.is_available() and CUDA_HOME is not None


def _extension():
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-fopenmp"]
    extra_link_args = ["-fopenmp"]
    if not _with_cuda():
        return CppExtension(
            "dino_detr._C",
            sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link_args,
        )
    if CUDA_HOME is None:
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME (e.g. /usr/local/cuda-13.0)")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;9.0")
    return CUDAExtension(
        "dino_detr._C",
        sources + sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu"))),
        define_macros=[("WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=extra_link_args,
    )


# Two cores by default: the build shares its machine with the tests.
os.environ.setdefault("MAX_JOBS", str(min(2, os.cpu_count() or 1)))

setup(
    name="dino_detr",
    version="0.1.0",
    description="DINO (DETR with Improved deNoising anchOr boxes) as a Detectron2 project",
    packages=find_packages(exclude=("tests", "tests.*", "tools", "tools.*", "configs", "configs.*")),
    python_requires=">=3.9",
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
