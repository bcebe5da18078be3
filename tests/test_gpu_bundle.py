"""The bundle for a bare GPU machine (tools/gpu_bundle.py): its lock against requirements.txt and the GPU
image, its verification (a changed, stray or missing file fails it), and, when `make gpu-bundle` has made it
(`make test` does, and sets DINO_DETR_REQUIRE_BUNDLE=1), the real bundle: hashes, wheel tags, and imports
from a pip --no-index install of it. The full rehearsal on Python 3.12 + torch 2.11 is `make gpu-rehearsal`."""

import importlib.util
import io
import os
import subprocess
import sys
import zipfile

import pytest

from train_utils import REPO

spec = importlib.util.spec_from_file_location("gpu_bundle", REPO / "tools" / "gpu_bundle.py")
gpu_bundle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_bundle)
install_detectron2 = gpu_bundle._install_detectron2()


def test_lock_holds_what_the_gpu_image_lacks_at_the_pinned_versions():
    locked = gpu_bundle.read_lock()
    pins = gpu_bundle.read_requirements()
    lacking = set(pins) - gpu_bundle.GPU_IMAGE - gpu_bundle.NOT_NEEDED_ON_GPU
    # omegaconf's and hydra-core's parser runtime is the one locked package requirements.txt does not name
    assert set(locked) == lacking | {"antlr4-python3-runtime"}
    for name in lacking:
        assert [version for version, _ in pins[name]] == [locked[name][0]], name
    assert locked["antlr4-python3-runtime"][0].startswith("4.9.")  # omegaconf 2.3: antlr4-python3-runtime==4.9.*
    # the GPU image has no Pillow < 10 (none for Python 3.12): the rehearsal installs requirements.txt's 3.12 pin
    assert any('python_version >= "3.12"' in line for line in gpu_bundle.image_requirements() if "pillow" in line)


def _wheel(name, version) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        wheel.writestr(
            f"{name}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        )
    return buffer.getvalue()


def _fake_bundle(tmp_path):
    """A bundle of one downloaded wheel and one sdist (with the wheel built from it), and its lock."""
    bundle = tmp_path / "bundle"
    files = {"wheels/termcolor-3.3.0-py3-none-any.whl": _wheel("termcolor", "3.3.0"), "sdist/fvcore-0.1.tar.gz": b"sd"}
    for rel, data in files.items():
        (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
        (bundle / rel).write_bytes(data)
    (bundle / "wheels" / "fvcore-0.1-py3-none-any.whl").write_bytes(_wheel("fvcore", "0.1"))
    package = bundle / "python" / "detectron2"
    (package / "data" / "transforms").mkdir(parents=True)
    (package / "data" / "transforms" / "transform.py").write_text("def f(interp=Image.LINEAR, fill=0): pass\n")
    install_detectron2.write_placeholder(str(package))
    install_detectron2.fix_for_pillow_10(str(package))
    lock = tmp_path / "lock"
    lock.write_text(
        f"# comment\ntermcolor==3.3.0 --hash=sha256:{gpu_bundle.sha256_of(bundle / 'wheels' / next(iter(files))[7:])}\n"
        f"fvcore==0.1 --hash=sha256:{gpu_bundle.sha256_of(bundle / 'sdist' / 'fvcore-0.1.tar.gz')}\n"
    )
    return bundle, lock


def test_verify_accepts_the_locked_files_and_names_each_problem(tmp_path):
    bundle, lock = _fake_bundle(tmp_path)
    manifest = gpu_bundle.verify(bundle, lock)
    assert set(manifest["files"]) == {
        "wheels/termcolor-3.3.0-py3-none-any.whl",
        "wheels/fvcore-0.1-py3-none-any.whl",
        "sdist/fvcore-0.1.tar.gz",
        "python/detectron2/_C.py",
        "python/detectron2/data/transforms/transform.py",
    }
    assert manifest["total_bytes"] == sum(f["bytes"] for f in manifest["files"].values())

    (bundle / "sdist" / "fvcore-0.1.tar.gz").write_bytes(b"sD")  # one byte changed
    with pytest.raises(ValueError, match=r"sdist/fvcore-0.1.tar.gz: SHA-256 \w+ is none of lock's"):
        gpu_bundle.verify(bundle, lock)
    (bundle / "sdist" / "fvcore-0.1.tar.gz").write_bytes(b"sd")
    (bundle / "wheels" / "fvcore-0.1-py3-none-any.whl").write_bytes(_wheel("fvcore", "0.2"))
    with pytest.raises(ValueError, match="a wheel of fvcore 0.2, which is no locked sdist"):
        gpu_bundle.verify(bundle, lock)
    (bundle / "wheels" / "fvcore-0.1-py3-none-any.whl").unlink()
    with pytest.raises(ValueError, match=r"no wheel built from the sdist of \['fvcore'\]"):
        gpu_bundle.verify(bundle, lock)
    (bundle / "wheels" / "termcolor-3.3.0-py3-none-any.whl").unlink()
    with pytest.raises(ValueError, match=r"no file of \['termcolor'\] with the locked hash"):
        gpu_bundle.verify(bundle, lock)


def test_verify_wants_detectron2_made_by_install_detectron2(tmp_path):
    bundle, lock = _fake_bundle(tmp_path)
    transform = bundle / "python" / "detectron2" / "data" / "transforms" / "transform.py"
    assert "interp=Image.BILINEAR," in transform.read_text()
    transform.write_text("def f(interp=Image.LINEAR, fill=0): pass\n")
    with pytest.raises(ValueError, match="still uses Image.LINEAR"):
        gpu_bundle.verify(bundle, lock)
    (bundle / "python" / "detectron2" / "_C.py").write_text("# a real build\n")
    with pytest.raises(ValueError, match="not tools/install_detectron2.py's placeholder"):
        gpu_bundle.verify(bundle, lock)


def test_pip_downloads_for_cpython_312_in_hash_checking_mode():
    command = gpu_bundle.pip_download_command("DEST")
    assert command[1:4] == ["-m", "pip", "download"]
    assert {"--no-deps", "--require-hashes"} <= set(command)
    assert command[command.index("--python-version") + 1] == "3.12"
    assert command[command.index("-r") + 1] == str(gpu_bundle.LOCK)
    assert "manylinux_2_17_x86_64" in command and "--index-url" not in command


@pytest.fixture(scope="module")
def bundle():
    if not (gpu_bundle.DEFAULT_DIR / "MANIFEST.json").is_file():
        if os.environ.get("DINO_DETR_REQUIRE_BUNDLE") == "1":
            pytest.fail("DINO_DETR_REQUIRE_BUNDLE=1 but build/gpu_bundle is not made (make gpu-bundle)")
        pytest.skip("build/gpu_bundle not made (make gpu-bundle)")
    return gpu_bundle.DEFAULT_DIR


def test_the_bundle_verifies_and_holds_cpython_312_x86_64_wheels(bundle):
    manifest = gpu_bundle.verify(bundle)
    assert manifest["total_bytes"] < 8 * 2**20  # with the ~1 MiB repository, far under the 64 MiB carried
    wheels = [f for f in manifest["files"] if f.startswith("wheels/")]
    assert len(wheels) == len(gpu_bundle.read_lock())
    for wheel in wheels:
        tags = wheel[: -len(".whl")].split("-")[-3:]
        assert tags == ["py3", "none", "any"] or (tags[0] == "cp312" and "manylinux" in tags[2]), wheel


def test_the_bundle_installs_without_an_index_and_imports(bundle, tmp_path):
    """What the GPU machine does: pip --no-index --target, then imports from there and from the bundle's
    Detectron2 sources (not from this venv's). The cp312 wheel (pycocotools) installs only on Python 3.12."""
    pure = sorted(str(p) for p in (bundle / "wheels").glob("*-py3-none-any.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(tmp_path), *pure],
        check=True,
    )
    code = (
        "import detectron2, detectron2.data, detectron2.engine, fvcore, iopath, omegaconf, hydra, yacs, termcolor\n"
        "from detectron2 import _C\n"
        "print(detectron2.__file__); print(fvcore.__file__); print(hydra.__file__); print(_C.has_cuda())"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(bundle / "python")])}
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path / "pycache")  # the bundle stays as made
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    detectron2, fvcore, hydra, has_cuda = run.stdout.split()
    assert detectron2 == str(bundle / "python" / "detectron2" / "__init__.py")
    assert fvcore.startswith(str(tmp_path)) and hydra.startswith(str(tmp_path)) and has_cuda == "False"
