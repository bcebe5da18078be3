#!/usr/bin/env python
"""The bundle a bare GPU machine without network needs to run `tools/gpu_check.py` (`make gpu-bundle`).

Such a machine has Python 3.12 with torch 2.11.0+cu130 and most of this project's dependencies
(GPU_IMAGE), but not Detectron2 nor what tools/gpu_bundle.lock pins. The bundle, in ``--dir``
(default build/gpu_bundle, ignored by git; carried to the machine with the repository):

  wheels/             the locked wheels (CPython 3.12, manylinux x86-64) as downloaded, their hashes checked
                      by pip against the lock, and wheels built here from the two locked pure-Python sdists
  sdist/              those sdists, as downloaded and checked
  python/detectron2/  Detectron2 v0.6's Python sources with the placeholder ``_C``, made by
                      tools/install_detectron2.py's ``install_package`` (its sdist checked there)
  MANIFEST.json       every file's size and SHA-256, and the total

There, `pip install --no-index --no-deps --target DIR wheels/*.whl` and PYTHONPATH=DIR:python make it
importable (tools/gpu_check_offline.sh). A second run downloads nothing while the bundle verifies.

    python tools/gpu_bundle.py [--dir build/gpu_bundle]        # make (or check) the bundle
    python tools/gpu_bundle.py --verify [--dir build/gpu_bundle]
    python tools/gpu_bundle.py --image-requirements            # requirements.txt's lines for what the image has
"""

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "tools" / "gpu_bundle.lock"
DEFAULT_DIR = REPO / "build" / "gpu_bundle"
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64")
# The GPU machines' image ('cuda', as read on such a machine on 2026-11-17) has these packages that
# requirements.txt or Detectron2 v0.6 name; they are not bundled (pip show NAME there gives the versions).
GPU_IMAGE = frozenset(
    "torch torchvision numpy scipy opencv-python-headless pillow setuptools ninja matplotlib tabulate cloudpickle "
    "tqdm tensorboard timm onnx onnxscript onnxruntime pytest pyyaml portalocker packaging typing-extensions".split()
)
# `make lint` runs here; OpenVINO is a CPU runtime of tools/benchmark.py --backends (not a GPU-check step).
NOT_NEEDED_ON_GPU = frozenset({"ruff", "openvino", "openvino-telemetry"})


def _install_detectron2():
    spec = importlib.util.spec_from_file_location("_install_detectron2", REPO / "tools" / "install_detectron2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def normalize(name: str) -> str:
    """A distribution's name as PEP 503 compares it (``Hydra_Core`` -> ``hydra-core``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path=LOCK) -> dict:
    """{normalized name: (version, sha256)} of a hash-pinned requirements file."""
    locked = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)\s+--hash=sha256:([0-9a-f]{64})", line)
        if not match:
            raise ValueError(f"{path}:{number}: expected 'NAME==VERSION --hash=sha256:HEX', got {line!r}")
        locked[normalize(match[1])] = (match[2], match[3])
    return locked


def read_requirements(path=REPO / "requirements.txt") -> dict:
    """{normalized name: [(version, full line), ...]} of the ``NAME==VERSION[; marker]`` lines."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        match = re.match(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line)
        if match:
            pins.setdefault(normalize(match[1]), []).append((match[2], line.strip()))
    return pins


def image_requirements(path=REPO / "requirements.txt") -> list:
    """requirements.txt's lines for the packages the GPU image has (what the rehearsal installs from PyPI)."""
    return [line for name, pins in read_requirements(path).items() if name in GPU_IMAGE for _, line in pins]


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def wheel_name_version(path) -> tuple:
    """(normalized name, version) from a wheel's METADATA."""
    with zipfile.ZipFile(path) as wheel:
        meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        fields = dict(
            line.split(": ", 1) for line in wheel.read(meta).decode().splitlines() if line[:5] in ("Name:", "Versi")
        )
    return normalize(fields["Name"]), fields["Version"]


def verify(bundle: Path, lock=LOCK) -> dict:
    """Checks the bundle against the lock and returns its manifest (files, sizes, hashes); raises
    ``ValueError`` naming the first problem: a file missing, extra or with another hash, a wheel built
    from an sdist of another name or version, Detectron2 without its placeholder ``_C``."""
    bundle = Path(bundle)
    locked = read_lock(lock)
    by_hash = {sha: name for name, (_, sha) in locked.items()}
    files = {p.relative_to(bundle).as_posix(): p for p in sorted(bundle.rglob("*")) if p.is_file()}
    files.pop("MANIFEST.json", None)
    manifest = {"files": {}, "total_bytes": 0}
    found, built = {}, {}
    for rel, path in files.items():
        sha = sha256_of(path)
        manifest["files"][rel] = {"bytes": path.stat().st_size, "sha256": sha}
        manifest["total_bytes"] += path.stat().st_size
        if rel.startswith("python/"):
            continue
        if not rel.startswith(("wheels/", "sdist/")) or rel.count("/") != 1:
            raise ValueError(f"{bundle}: unexpected file {rel}")
        if sha in by_hash:
            found[by_hash[sha]] = rel
        elif rel.startswith("wheels/") and rel.endswith(".whl"):
            built[rel] = wheel_name_version(path)
        else:
            raise ValueError(f"{bundle}/{rel}: SHA-256 {sha} is none of {lock.name}'s (a changed or stray file)")
    missing = sorted(set(locked) - set(found))
    if missing:
        raise ValueError(f"{bundle}: no file of {missing} with the locked hash; run `make gpu-bundle`")
    sdists = {name for name, rel in found.items() if rel.startswith("sdist/")}
    for rel, (name, version) in built.items():
        if name not in sdists or locked[name][0] != version:
            raise ValueError(f"{bundle}/{rel}: a wheel of {name} {version}, which is no locked sdist")
    unbuilt = sorted(sdists - {name for name, _ in built.values()})
    if unbuilt:
        raise ValueError(f"{bundle}: no wheel built from the sdist of {unbuilt}; run `make gpu-bundle`")
    tool = _install_detectron2()
    placeholder = bundle / "python" / "detectron2" / "_C.py"
    if not placeholder.is_file() or placeholder.read_text() != tool.PLACEHOLDER_C:
        raise ValueError(f"{placeholder}: missing or not tools/install_detectron2.py's placeholder")
    transform = bundle / "python" / "detectron2" / tool.PILLOW_10_FILE
    if tool.PILLOW_10_OLD in transform.read_text():
        raise ValueError(f"{transform}: still uses Image.LINEAR (gone in Pillow 10)")
    return manifest


def pip_download_command(dest) -> list:
    """pip, in hash-checking mode, downloading the lock's files for CPython 3.12 on manylinux x86-64
    (its own wheel where PyPI has one, else the sdist)."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    return [
        *(sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--no-build-isolation"),
        *("--python-version", PYTHON_VERSION, "--implementation", "cp", *platforms),
        *("-r", str(LOCK), "-d", str(dest)),
    ]


def make(bundle: Path, cache_dir: str) -> dict:
    bundle = Path(bundle)
    try:
        return verify(bundle)
    except (ValueError, OSError) as e:
        print(f"gpu-bundle: (re)making {bundle}: {e}", flush=True)
    shutil.rmtree(bundle, ignore_errors=True)
    (bundle / "wheels").mkdir(parents=True)
    (bundle / "sdist").mkdir()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(pip_download_command(tmp), check=True)
        for path in Path(tmp).iterdir():
            shutil.move(str(path), bundle / ("wheels" if path.suffix == ".whl" else "sdist") / path.name)
    for sdist in sorted((bundle / "sdist").iterdir()):  # pure Python: the wheel runs on any CPython 3
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
            + ["-w", str(bundle / "wheels"), str(sdist)],
            check=True,
        )
    tool = _install_detectron2()
    tool.install_package(tool.fetch_sdist(cache_dir), str(bundle / "python"))
    for cache in (bundle / "python").rglob("__pycache__"):
        shutil.rmtree(cache)
    return verify(bundle)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=str(DEFAULT_DIR), help="the bundle's folder")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/dino_detr"), help="Detectron2's sdist")
    parser.add_argument("--verify", action="store_true", help="only check the bundle against the lock")
    parser.add_argument("--image-requirements", action="store_true", help="print the GPU image's requirements")
    args = parser.parse_args(argv)
    if args.image_requirements:
        print("\n".join(image_requirements()))
        return
    try:
        manifest = verify(Path(args.dir)) if args.verify else make(Path(args.dir), args.cache_dir)
    except ValueError as e:
        sys.exit(f"gpu-bundle: {e}")
    if not args.verify:
        (Path(args.dir) / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    wheels = sorted(f for f in manifest["files"] if f.startswith("wheels/"))
    python = sum(v["bytes"] for f, v in manifest["files"].items() if f.startswith("python/"))
    print(
        f"gpu-bundle: {args.dir} verified: {manifest['total_bytes'] / 2**20:.1f} MiB "
        f"({len(wheels)} wheels; Detectron2's sources {python / 2**20:.1f} MiB)"
    )


if __name__ == "__main__":
    main()
