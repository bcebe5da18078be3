#!/usr/bin/env python
"""Make Detectron2 importable in this Python environment, without compiling it.

If ``import detectron2`` already works (e.g. installed from its git repository, the upstream
way), nothing is done. Otherwise the PyPI sdist ``pb1-detectron2==0.6`` (Detectron2 v0.6's Python
sources exactly, without its C++ sources) is downloaded, checked against its pinned SHA-256, and
its ``detectron2/`` package copied into site-packages together with a placeholder
``detectron2._C`` that raises a clear error if one of Detectron2's own C++ ops is ever called.
DINO needs none of them.
"""
import argparse
import hashlib
import importlib.util
import io
import os
import sys
import sysconfig
import tarfile
import urllib.request

SDIST_URL = (
    "https://files.pythonhosted.org/packages/60/26/"
    "48f5bbb7ee492696a21da23303daeecdfe3942c498a70d34108acf63b2bd/pb1-detectron2-0.6.tar.gz"
)
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
PACKAGE_PREFIX = "pb1-detectron2-0.6/detectron2/"

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


def _download(url, cache_dir):
    path = os.path.join(cache_dir, os.path.basename(url))
    if not os.path.isfile(path):
        os.makedirs(cache_dir, exist_ok=True)
        print(f"Downloading {url}")
        with urllib.request.urlopen(url, timeout=120) as r:
            data = r.read()
        tmp = path + ".part"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SDIST_SHA256:
        os.remove(path)
        sys.exit(f"error: {path} has SHA-256 {digest}, expected {SDIST_SHA256}; removed, run again")
    return data


def install(cache_dir, site_packages):
    data = _download(SDIST_URL, cache_dir)
    target = os.path.join(site_packages, "detectron2")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(PACKAGE_PREFIX) and m.isfile()]
        if not members:
            sys.exit(f"error: {SDIST_URL} holds no {PACKAGE_PREFIX}")
        for m in members:
            dest = os.path.join(target, m.name[len(PACKAGE_PREFIX):])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(tar.extractfile(m).read())
    write_placeholder(target)
    print(f"Installed Detectron2 v0.6 (Python sources, no C++ ops) into {target}")


def write_placeholder(package_dir):
    with open(os.path.join(package_dir, "_C.py"), "w") as f:
        f.write(PLACEHOLDER_C)


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/dino_detr"))
    parser.add_argument("--force", action="store_true", help="reinstall even if importable")
    args = parser.parse_args()
    if importlib.util.find_spec("detectron2") is not None and not args.force:
        import detectron2

        print(f"detectron2 {detectron2.__version__} already importable from {detectron2.__path__[0]}")
        if refresh_placeholder(detectron2.__path__[0]):
            print("updated its placeholder detectron2._C")
        return
    install(args.cache_dir, sysconfig.get_paths()["purelib"])


if __name__ == "__main__":
    main()
