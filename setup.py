"""Builds the `dino_detr` package and its native extension `dino_detr._C`.

The C++ CPU kernels are always built. The CUDA kernels are added when CUDA is usable
(torch sees a GPU and CUDA_HOME is found) or when FORCE_CUDA=1 (e.g. CI without a GPU,
so that the kernels are at least compiled). CUDA architectures
(dino_detr/layers/cuda_arch.py): TORCH_CUDA_ARCH_LIST when set (e.g. "8.6;9.0+PTX");
otherwise the visible GPUs; otherwise every architecture of the installed nvcc from
Turing (7.5) to Blackwell, with PTX for the newest. MAX_JOBS (parallel compile jobs,
also nvcc's threads per file) and CUDA_HOME are torch's: set them to override its defaults.

    pip install --no-build-isolation --no-deps -e .

Supported: torch 2.11 to 2.14 (and their torchvision), Python 3.11 and 3.12 (requirements.txt); tested with
torch 2.14.1 (CI) and torch 2.11.0 on Python 3.12, the GPU machines' image (`make gpu-rehearsal`).
"""

import glob
import importlib.util
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

CSRC = os.path.join("dino_detr", "csrc")


def _load_cuda_arch():
    """dino_detr/layers/cuda_arch.py, without importing the package (not built yet)."""
    path = os.path.join("dino_detr", "layers", "cuda_arch.py")
    spec = importlib.util.spec_from_file_location("_dino_detr_cuda_arch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _with_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.cuda.is_available() and CUDA_HOME is not None


def _cuda_codes() -> tuple:
    """(nvcc codes to build, their -gencode flags)."""
    cuda_arch = _load_cuda_arch()
    capabilities = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    nvcc_sass = cuda_arch.nvcc_sass_codes(os.path.join(CUDA_HOME, "bin", "nvcc"))
    codes, reason = cuda_arch.resolve_build_codes(os.environ.get("TORCH_CUDA_ARCH_LIST"), capabilities, nvcc_sass)
    print(f"dino_detr._C: CUDA architectures {cuda_arch.format_codes(codes)} ({reason})")
    return codes, cuda_arch.gencode_flags(codes)


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
    codes, gencode = _cuda_codes()
    # The -gencode flags replace torch's own TORCH_CUDA_ARCH_LIST handling; the codes are
    # compiled in for the kernel-image check (dino_detr/csrc/cuda/build_info.cu).
    # nvcc compiles a file's architectures in parallel: MAX_JOBS threads, else one per core.
    threads = f"--threads={os.environ.get('MAX_JOBS', '0')}"
    nvcc_flags = ["-O3", "-lineinfo", threads, *gencode, f"-DDINO_DETR_CUDA_CODES={'.'.join(codes)}"]
    return CUDAExtension(
        "dino_detr._C",
        sources + sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu"))),
        define_macros=[("WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=extra_link_args,
    )


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
