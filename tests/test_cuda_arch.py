"""Portable CUDA builds, on the CPU: which architectures setup.py builds, the rule that says
whether a build runs on a GPU, the one error a missing kernel image gives, and the Makefile's
toolkit / job-count fallbacks."""

import os
import re
import subprocess

import pytest
import torch

from dino_detr.layers import cuda_arch, native_extension_available
from dino_detr.layers.cuda_arch import (
    check_kernel_image,
    format_codes,
    gencode_flags,
    image_runs_on,
    missing_image_message,
    nvcc_sass_codes,
    parse_arch_list,
    resolve_build_codes,
)

from train_utils import REPO

# `nvcc --list-gpu-code` of CUDA 13.0, and an older toolkit's with pre-Turing and suffixed codes.
NVCC_13_0 = [
    "sm_75",
    "sm_80",
    "sm_86",
    "sm_87",
    "sm_88",
    "sm_89",
    "sm_90",
    "sm_100",
    "sm_110",
    "sm_103",
    "sm_120",
    "sm_121",
]
NVCC_OLD = [
    "sm_50",
    "sm_60",
    "sm_70",
    "sm_75",
    "sm_80",
    "sm_86",
    "sm_89",
    "sm_90",
    "sm_90a",
    "sm_100",
    "sm_100a",
    "sm_120",
]


def test_parse_and_format_arch_list():
    codes = parse_arch_list(" 12.0+PTX;7.5 8.6;9.0a ")
    assert codes == ["sm_75", "sm_86", "sm_90a", "sm_120", "compute_120"]
    assert format_codes(codes) == "7.5;8.6;9.0a;12.0+PTX"
    assert gencode_flags(["sm_90a", "compute_120"]) == [
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_120,code=compute_120",
    ]
    for bad in ("Ampere", "8.6+ptx", "86", "8.6;;sm_90"):
        with pytest.raises(ValueError, match=r"TORCH_CUDA_ARCH_LIST=.*cannot read"):
            parse_arch_list(bad)


@pytest.mark.parametrize(
    "capability,codes,runs",
    [
        ((8, 6), ["sm_80"], True),  # SASS runs on a newer minor of its major
        ((8, 0), ["sm_86"], False),  # ... not on an older minor
        ((9, 0), ["sm_80", "sm_86"], False),  # ... nor on another major
        ((9, 0), ["compute_80"], True),  # PTX is JIT-compiled for newer GPUs
        ((12, 0), ["sm_90", "compute_90"], True),
        ((7, 5), ["compute_80"], False),  # ... never for older ones
        ((9, 0), ["sm_90a"], True),  # arch-specific: that capability only
        ((10, 0), ["sm_90a", "compute_90a"], False),
        ((10, 3), ["sm_100f"], True),  # family-specific: its major, newer minors
        ((12, 0), ["sm_100", "sm_110"], False),
        ((7, 5), [], False),
    ],
)
def test_kernel_image_compatibility_rule(capability, codes, runs):
    assert image_runs_on(capability, codes) is runs


def test_default_build_covers_every_architecture_from_turing_to_blackwell():
    codes, reason = resolve_build_codes(None, [], NVCC_13_0)
    assert codes == sorted(NVCC_13_0, key=lambda c: int(c[3:])) + ["compute_121"]
    assert "no GPU" in reason
    assert format_codes(codes) == "7.5;8.0;8.6;8.7;8.8;8.9;9.0;10.0;10.3;11.0;12.0;12.1+PTX"
    older, _ = resolve_build_codes("", [], NVCC_OLD)
    assert older == ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120", "compute_120"]
    for code in NVCC_13_0:
        assert image_runs_on((int(code[3:-1]), int(code[-1])), codes), code
    assert image_runs_on((13, 0), codes)  # a future GPU through PTX


def test_build_for_the_visible_gpus_or_the_users_list():
    assert resolve_build_codes(None, [(9, 0)], NVCC_13_0) == (["sm_90", "compute_90"], "the visible GPUs")
    assert resolve_build_codes("native", [(8, 6), (7, 5), (8, 6)], NVCC_13_0)[0] == ["sm_75", "sm_86", "compute_86"]
    # A GPU newer than nvcc: the newest architecture that runs on it.
    assert resolve_build_codes(None, [(12, 1)], NVCC_OLD)[0] == ["sm_120", "compute_120"]
    with pytest.raises(RuntimeError, match="compute capability 6.1"):
        resolve_build_codes(None, [(6, 1)], NVCC_13_0)
    # The user's list wins over the visible GPU.
    assert resolve_build_codes("9.0+PTX", [(7, 5)], NVCC_13_0) == (["sm_90", "compute_90"], "TORCH_CUDA_ARCH_LIST")


def test_nvcc_architectures_are_read_from_nvcc(tmp_path):
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\n[ \"$1\" = --list-gpu-code ] && printf 'sm_90\\nsm_75\\nsm_120\\n'\n")
    nvcc.chmod(0o755)
    assert nvcc_sass_codes(str(nvcc)) == ["sm_75", "sm_90", "sm_120"]


def test_missing_image_error_names_the_gpu_and_how_to_rebuild():
    message = missing_image_message("cuda:1", "Tesla T4", (7, 5), ["sm_80", "sm_90", "compute_90"])
    assert "cuda:1 (Tesla T4, compute capability 7.5)" in message
    assert "built for TORCH_CUDA_ARCH_LIST='8.0;9.0+PTX'" in message
    assert "TORCH_CUDA_ARCH_LIST='7.5' pip install --no-build-isolation --no-deps -e ." in message


@pytest.fixture
def fake_gpu(monkeypatch):
    """cuda_arch's view of a GPU: a build of sm_80 + PTX 9.0 and a device of settable capability."""
    device = {"capability": (7, 5), "queries": 0}

    def capability(index):
        device["queries"] += 1
        return device["capability"]

    monkeypatch.setattr(cuda_arch, "_built_codes", lambda: ["sm_80", "compute_90"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Tesla T4")
    cuda_arch._checked.cache_clear()
    yield device
    cuda_arch._checked.cache_clear()


def test_kernel_image_check_raises_once_clearly_and_caches_success(fake_gpu):
    with pytest.raises(RuntimeError, match=re.escape("cuda:0 (Tesla T4, compute capability 7.5)")):
        check_kernel_image(torch.device("cuda", 0))
    fake_gpu["capability"] = (9, 0)  # runs through the PTX
    for _ in range(3):
        check_kernel_image(torch.device("cuda", 0))
    assert fake_gpu["queries"] == 2  # one failed check, then one cached success
    check_kernel_image(torch.device("cpu"))
    assert fake_gpu["queries"] == 2


@pytest.mark.skipif(not native_extension_available(), reason="needs dino_detr._C")
def test_the_build_records_its_architectures():
    from dino_detr import _C

    if not _C.WITH_CUDA:
        pytest.skip("dino_detr._C was built without CUDA")
    codes = torch.ops.dino_detr.cuda_arch_list().split(",")
    assert codes and parse_arch_list(format_codes(codes)) == codes
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):  # make test: the list the Makefile built with
        assert format_codes(codes) == format_codes(parse_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])), (
            "dino_detr._C was built for another TORCH_CUDA_ARCH_LIST; rebuild it"
        )


def _make_variables(env_changes, *names):
    """The Makefile's values of ``names`` (make -p), with the environment changed."""
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    out = subprocess.run(
        ["make", "-C", str(REPO), "-n", "-p", "setup"], env=env, capture_output=True, text=True, check=True
    ).stdout
    found = dict(re.findall(r"^(\w+) :?= (.*)$", out, flags=re.M))
    return [found.get(name) for name in names]


def test_makefile_prefers_the_users_cuda_home_nvcc_and_jobs(tmp_path):
    toolkit = tmp_path / "cuda-x"
    (toolkit / "bin").mkdir(parents=True)
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ TOP={toolkit}/bin/..'\n")
    nvcc.chmod(0o755)
    assert _make_variables({"CUDA_HOME": str(toolkit), "MAX_JOBS": "7"}, "CUDA_HOME", "MAX_JOBS") == [str(toolkit), "7"]
    # No CUDA_HOME: the toolkit of the nvcc on PATH (it names its root), and two jobs.
    wrapper = tmp_path / "bin"
    wrapper.mkdir()
    (wrapper / "nvcc").symlink_to(nvcc)
    path = f"{wrapper}:{os.environ['PATH']}"
    assert _make_variables({"CUDA_HOME": None, "MAX_JOBS": None, "PATH": path}, "CUDA_HOME", "MAX_JOBS") == [
        str(toolkit),
        "2",
    ]


def test_a_build_that_does_not_list_its_architectures_is_not_refused(fake_gpu, monkeypatch):
    monkeypatch.setattr(cuda_arch, "_built_codes", lambda: None)  # e.g. compiled without setup.py
    check_kernel_image(torch.device("cuda", 0))  # a T4: left to CUDA's own error, if any
