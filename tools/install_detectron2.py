#!/usr/bin/env python
"""Make Detectron2 importable in this Python environment, without compiling it.

If ``import detectron2`` already works (e.g. installed from its git repository, the upstream
way), nothing is done. Otherwise pip downloads the sdist ``pb1-detectron2==0.6`` (Detectron2 v0.6's
Python sources exactly, without its C++ sources) from your configured index (``pip config``,
``PIP_INDEX_URL``, proxies and mirrors apply), the archive is checked against its pinned SHA-256,
and its ``detectron2/`` package copied into site-packages together with a placeholder
``detectron2._C`` that raises a clear error if one of Detectron2's own C++ ops is ever called
(DINO needs none of them), and v0.6's one use of ``Image.LINEAR`` (gone in Pillow 10, the only Pillow
with wheels for Python 3.12) replaced by the same constant's other name, ``Image.BILINEAR``, as upstream did.
"""

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile

SDIST_REQUIREMENT = "pb1-detectron2==0.6"
SDIST_FILE = "pb1-detectron2-0.6.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
PACKAGE_PREFIX = "pb1-detectron2-0.6/detectron2/"

# The one line of v0.6 that newer Pillow breaks (see fix_for_pillow_10).
PILLOW_10_FILE = "data/transforms/transform.py"
PILLOW_10_OLD = "interp=Image.LINEAR,"
PILLOW_10_NEW = "interp=Image.BILINEAR,"

PLACEHOLDER_MARK = "Written by dino_detr's tools/install_detectron2.py."
PLACEHOLDER_C = '''"""Placeholder for Detectron2's compiled ops, which this offline install does not build.

Written by dino_detr's tools/install_detectron2.py. Any use of one of Detectron2's C++ ops
(deformable conv, rotated boxes, the fast COCO evaluator, ...) raises an error naming it.
The build-information functions that Detectron2's collect_env_info() (run by default_setup)
asks for answer that nothing was built.
"""


class MissingDetectron2Op(RuntimeError):
    pass


def get_compiler_version():
    return "not built (offline install of Detectron2's Python sources)"


def get_cuda_version():
    return "not built"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise MissingDetectron2Op(
        f"detectron2._C.{name} is one of Detectron2's C++ ops, which this offline install of "
        "Detectron2 v0.6 does not build. DINO does not need it (use COCOEvaluator(..., "
        "use_fast_impl=False)). To use it, install Detectron2 from its git repository: "
        "pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'"
    )
'''


def pip_download_command(dest: str) -> list:
    """The pip command that puts the sdist into ``dest``. Without build isolation, because pip
    reads the sdist's metadata by running its setup.py, which imports torch."""
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-build-isolation",
        "--no-binary",
        ":all:",
        SDIST_REQUIREMENT,
        "-d",
        dest,
    ]


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_sdist(cache_dir: str) -> str:
    """Path of the verified sdist in ``cache_dir``, downloaded with pip when it is not there."""
    path = os.path.join(cache_dir, SDIST_FILE)
    if not os.path.isfile(path):
        os.makedirs(cache_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            command = pip_download_command(tmp)
            print("Running", " ".join(command), flush=True)
            if subprocess.run(command).returncode != 0:
                sys.exit(
                    f"error: pip could not download {SDIST_REQUIREMENT} (see its output above; torch and "
                    "setuptools must be installed first, and your pip index must serve PyPI's sdists)"
                )
            downloaded = os.path.join(tmp, SDIST_FILE)
            if not os.path.isfile(downloaded):
                sys.exit(f"error: pip reported success but wrote no {SDIST_FILE} (got {sorted(os.listdir(tmp))})")
            os.replace(downloaded, path)
    digest = sha256_of(path)
    if digest != SDIST_SHA256:
        os.remove(path)
        sys.exit(f"error: {path} has SHA-256 {digest}, expected {SDIST_SHA256}; removed, run again")
    return path


def extract_package(sdist: str, target: str) -> int:
    """Copies the sdist's ``detectron2/`` files into ``target``; returns how many."""
    root = os.path.realpath(target)
    count = 0
    with tarfile.open(sdist, mode="r:gz") as tar:
        for m in tar.getmembers():
            if not (m.isfile() and m.name.startswith(PACKAGE_PREFIX)):
                continue
            dest = os.path.realpath(os.path.join(root, m.name[len(PACKAGE_PREFIX) :]))
            if not dest.startswith(root + os.sep):
                sys.exit(f"error: {sdist} member {m.name} points outside the package")
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with tar.extractfile(m) as src, open(dest, "wb") as f:
                shutil.copyfileobj(src, f)
            count += 1
    if count == 0:
        sys.exit(f"error: {sdist} holds no {PACKAGE_PREFIX}")
    return count


def install_package(sdist: str, site_packages: str) -> str:
    """Detectron2's ``detectron2/`` from the verified ``sdist`` into ``site_packages``, with the
    placeholder ``_C`` and the Pillow fix; returns the package's folder. Used by this script and by
    tools/gpu_bundle.py (the bundle for a GPU machine without network)."""
    target = os.path.join(site_packages, "detectron2")
    extract_package(sdist, target)
    write_placeholder(target)
    fix_for_pillow_10(target)
    return target


def install(cache_dir: str, site_packages: str) -> None:
    target = install_package(fetch_sdist(cache_dir), site_packages)
    print(f"Installed Detectron2 v0.6 (Python sources, no C++ ops) into {target}")


def fix_for_pillow_10(package_dir) -> bool:
    """v0.6 names ``Image.LINEAR`` as a default argument (data/transforms/transform.py), which Pillow 10
    removed: importing ``detectron2.data`` fails there, and Pillow < 10 has no wheels for Python 3.12.
    Upstream Detectron2 (main) writes ``Image.BILINEAR``, the same constant (2) in every Pillow; so does
    this. Returns whether the file changed."""
    path = os.path.join(package_dir, *PILLOW_10_FILE.split("/"))
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        source = f.read()
    if PILLOW_10_OLD not in source:
        return False
    with open(path, "w") as f:
        f.write(source.replace(PILLOW_10_OLD, PILLOW_10_NEW))
    return True


def write_placeholder(package_dir):
    with open(os.path.join(package_dir, "_C.py"), "w") as f:
        f.write(PLACEHOLDER_C)


def is_offline_install(package_dir) -> bool:
    """Whether ``package_dir`` was installed by this script (its ``_C.py`` is the placeholder)."""
    path = os.path.join(package_dir, "_C.py")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return PLACEHOLDER_MARK in f.read()


def refresh_placeholder(package_dir) -> bool:
    """Rewrite an earlier version of this script's placeholder; never touches a real build."""
    path = os.path.join(package_dir, "_C.py")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        current = f.read()
    if PLACEHOLDER_MARK not in current or current == PLACEHOLDER_C:
        return False
    write_placeholder(package_dir)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/dino_detr"))
    parser.add_argument("--force", action="store_true", help="reinstall even if importable")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("detectron2") is not None and not args.force:
        import detectron2

        print(f"detectron2 {detectron2.__version__} already importable from {detectron2.__path__[0]}")
        if refresh_placeholder(detectron2.__path__[0]):
            print("updated its placeholder detectron2._C")
        if is_offline_install(detectron2.__path__[0]) and fix_for_pillow_10(detectron2.__path__[0]):
            print(f"replaced Image.LINEAR (gone in Pillow 10) by Image.BILINEAR in its {PILLOW_10_FILE}")
        return
    install(args.cache_dir, sysconfig.get_paths()["purelib"])


if __name__ == "__main__":
    main()
