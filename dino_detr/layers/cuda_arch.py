"""CUDA architectures: which ones ``dino_detr._C`` is built for, and whether a build runs on a GPU.

An architecture is named as nvcc names it: ``sm_86`` is machine code (SASS) for compute
capability 8.6, ``compute_90`` is PTX for 9.0. SASS for X.y runs on X.z with z >= y (same
major); PTX for a capability at most the device's is compiled by the driver at load time.
Suffixed variants (``sm_90a``, ``sm_100f``) run on exactly that capability / that family.

``setup.py`` loads this file by path (it needs nothing but torch) to pick the architectures
(:func:`resolve_build_codes`); the op calls :func:`check_kernel_image` before its first CUDA
launch on a device, so a build without a usable image fails with one clear error.
"""

import functools
import re
import subprocess
from typing import Optional

import torch

__all__ = [
    "parse_arch_list",
    "gencode_flags",
    "nvcc_sass_codes",
    "resolve_build_codes",
    "image_runs_on",
    "missing_image_message",
    "check_kernel_image",
]

# The default build covers every architecture of the installed nvcc from Turing up to Blackwell.
OLDEST = (7, 5)
NEWEST_MAJOR = 12
_TOKEN = re.compile(r"(\d+)\.(\d)([af]?)(\+PTX)?")
_CODE = re.compile(r"(sm|compute)_(\d+)(\d)([af]?)")
REBUILD = "pip install --no-build-isolation --no-deps -e ."


def _split_code(code: str):
    """ "sm_90a" -> ("sm", (9, 0), "a")."""
    match = _CODE.fullmatch(code)
    if match is None:
        raise ValueError(f"not an nvcc architecture name: {code!r} (expected e.g. 'sm_86' or 'compute_90')")
    kind, major, minor, suffix = match.groups()
    return kind, (int(major), int(minor)), suffix


def _sort_key(code: str):
    kind, cc, suffix = _split_code(code)
    return cc, suffix, kind == "compute"


def parse_arch_list(text: str) -> list:
    """``TORCH_CUDA_ARCH_LIST`` syntax ("7.5;8.6 9.0a;12.0+PTX") -> sorted nvcc codes
    (["sm_75", "sm_86", "sm_90a", "sm_120", "compute_120"])."""
    codes = set()
    for token in re.split(r"[;\s]+", text.strip()):
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise ValueError(
                f"TORCH_CUDA_ARCH_LIST={text!r}: cannot read {token!r}; expected compute capabilities "
                "such as '8.6', '9.0a' or '12.0+PTX' separated by ';'"
            )
        major, minor, suffix, ptx = match.groups()
        codes.add(f"sm_{major}{minor}{suffix}")
        if ptx:
            codes.add(f"compute_{major}{minor}{suffix}")
    return sorted(codes, key=_sort_key)


def format_codes(codes) -> str:
    """Codes -> ``TORCH_CUDA_ARCH_LIST`` syntax (PTX-only entries are written as X.Y+PTX too)."""
    entries = {}
    for code in codes:
        kind, (major, minor), suffix = _split_code(code)
        name = f"{major}.{minor}{suffix}"
        entries[name] = entries.get(name, False) or kind == "compute"
    ordered = sorted(entries, key=lambda n: _sort_key("sm_" + n.replace(".", "")))
    return ";".join(name + ("+PTX" if entries[name] else "") for name in ordered)


def gencode_flags(codes) -> list:
    """nvcc flags that build exactly ``codes``."""
    flags = []
    for code in codes:
        kind, (major, minor), suffix = _split_code(code)
        flags.append(f"-gencode=arch=compute_{major}{minor}{suffix},code={code}")
    return flags


def nvcc_sass_codes(nvcc: str) -> list:
    """The SASS architectures ``nvcc`` can build (``nvcc --list-gpu-code``), sorted."""
    out = subprocess.run([nvcc, "--list-gpu-code"], check=True, capture_output=True, text=True).stdout
    return sorted((c for c in out.split() if c.startswith("sm_")), key=_sort_key)


def resolve_build_codes(arch_list, device_capabilities, nvcc_sass) -> tuple:
    """The codes to build and why.

    Args:
        arch_list: ``TORCH_CUDA_ARCH_LIST`` (None or "" when unset; "native" = the visible GPUs).
        device_capabilities: compute capabilities (major, minor) of the visible GPUs.
        nvcc_sass: what the installed nvcc supports (:func:`nvcc_sass_codes`).

    Returns:
        (codes, reason): the user's list when given; else the visible GPUs (each at the newest
        architecture nvcc has that runs on it) with PTX for the newest; else every nvcc
        architecture from Turing to Blackwell with PTX for the newest.
    """
    if arch_list and arch_list != "native":
        return parse_arch_list(arch_list), "TORCH_CUDA_ARCH_LIST"
    plain = [c for c in nvcc_sass if _split_code(c)[2] == ""]
    if device_capabilities:
        chosen = set()
        for cc in sorted(set(map(tuple, device_capabilities))):
            runnable = [c for c in plain if image_runs_on(cc, [c])]
            if not runnable:
                raise RuntimeError(
                    f"the installed nvcc builds {', '.join(plain)}, none of which runs on the visible GPU "
                    f"of compute capability {cc[0]}.{cc[1]}; use a CUDA toolkit that supports it"
                )
            chosen.add(runnable[-1])
        reason = "the visible GPUs"
    else:
        chosen = {c for c in plain if OLDEST <= _split_code(c)[1] and _split_code(c)[1][0] <= NEWEST_MAJOR}
        if not chosen:
            raise RuntimeError(f"the installed nvcc supports none of Turing to Blackwell ({', '.join(nvcc_sass)})")
        reason = "no GPU visible: every architecture of nvcc from Turing to Blackwell"
    newest = max(chosen, key=_sort_key)
    return sorted(chosen | {newest.replace("sm_", "compute_")}, key=_sort_key), reason


def image_runs_on(capability, codes) -> bool:
    """Whether a build of ``codes`` has an image for a GPU of ``capability`` (major, minor)."""
    capability = tuple(capability)
    for code in codes:
        kind, cc, suffix = _split_code(code)
        if suffix == "a":
            runs = cc == capability
        elif suffix == "f" or kind == "sm":
            runs = cc[0] == capability[0] and cc[1] <= capability[1]
        else:  # plain PTX: just-in-time compiled for any newer GPU
            runs = cc <= capability
        if runs:
            return True
    return False


def missing_image_message(device: str, name: str, capability, codes) -> str:
    major, minor = capability
    built = format_codes(codes) if codes else "no architecture"
    return (
        f"dino_detr._C has no CUDA kernel image for {device} ({name}, compute capability {major}.{minor}): "
        f"it was built for TORCH_CUDA_ARCH_LIST={built!r}. Rebuild it for this GPU from the repository root: "
        f"TORCH_CUDA_ARCH_LIST='{major}.{minor}' {REBUILD} (or leave TORCH_CUDA_ARCH_LIST unset on a "
        "machine with this GPU, which builds for the visible GPUs)."
    )


def _built_codes() -> Optional[list]:
    """The codes dino_detr._C was built for; None when it does not say (built without setup.py)."""
    from dino_detr import _C

    if not _C.WITH_CUDA:
        raise RuntimeError(
            "dino_detr._C was built without CUDA kernels and cannot run on a GPU; rebuild it with the CUDA "
            f"toolkit found (CUDA_HOME, or FORCE_CUDA=1): {REBUILD}"
        )
    listed = torch.ops.dino_detr.cuda_arch_list()
    return listed.split(",") if listed else None


@functools.cache
def _checked(index: int) -> None:
    codes = _built_codes()
    if codes is None:
        return
    capability = torch.cuda.get_device_capability(index)
    if not image_runs_on(capability, codes):
        raise RuntimeError(missing_image_message(f"cuda:{index}", torch.cuda.get_device_name(index), capability, codes))


def check_kernel_image(device: torch.device) -> None:
    """Raises ``RuntimeError`` (naming the GPU's compute capability and how to rebuild) when
    ``dino_detr._C`` cannot run on ``device``; checked once per device."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return
    _checked(device.index if device.index is not None else torch.cuda.current_device())
