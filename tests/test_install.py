"""tools/install_detectron2.py without network: the pip command it runs, and the checks and the
extraction of the sdist, on a small fake sdist written by the test (pip is replaced by a stub)."""

import hashlib
import importlib.util
import io
import os
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "install_detectron2.py"


@pytest.fixture
def tool():
    spec = importlib.util.spec_from_file_location("install_detectron2_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_sdist(path: Path, extra=()) -> str:
    """A gzipped tar laid out like the real sdist; returns its SHA-256."""
    files = {
        "pb1-detectron2-0.6/setup.py": b"raise SystemExit('not to be run')\n",
        "pb1-detectron2-0.6/detectron2/__init__.py": b"__version__ = '0.6'\n",
        "pb1-detectron2-0.6/detectron2/layers/nms.py": b"X = 1\n",
        **dict(extra),
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _FakePip:
    """Stands in for ``subprocess.run``: records the command and 'downloads' ``source`` into its -d."""

    def __init__(self, source: Path, returncode: int = 0):
        self.source, self.returncode, self.commands = source, returncode, []

    def __call__(self, command):
        self.commands.append(command)
        if self.returncode == 0:
            dest = command[command.index("-d") + 1]
            Path(dest, self.source.name).write_bytes(self.source.read_bytes())
        return type("Completed", (), {"returncode": self.returncode})()


def test_pip_command_goes_through_the_users_pip_configuration(tool):
    command = tool.pip_download_command("DEST")
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert command[command.index("--no-binary") + 1] == ":all:"
    assert {"--no-deps", "--no-build-isolation", "pb1-detectron2==0.6"} <= set(command)
    assert command[command.index("-d") + 1] == "DEST"
    # No index or URL of our own: pip's configuration decides where the file comes from.
    assert not any("://" in part or part.startswith(("--index", "-i", "--extra-index")) for part in command)
    assert "files.pythonhosted.org" not in SCRIPT.read_text()


def test_install_verifies_and_extracts_the_package_only(tool, tmp_path, monkeypatch):
    sdist = tmp_path / "src" / tool.SDIST_FILE
    sdist.parent.mkdir()
    monkeypatch.setattr(tool, "SDIST_SHA256", _fake_sdist(sdist))
    pip = _FakePip(sdist)
    monkeypatch.setattr(tool.subprocess, "run", pip)
    cache, site = tmp_path / "cache", tmp_path / "site"

    tool.install(str(cache), str(site))
    package = site / "detectron2"
    assert (package / "__init__.py").read_text() == "__version__ = '0.6'\n"
    assert (package / "layers" / "nms.py").read_text() == "X = 1\n"
    assert (package / "_C.py").read_text() == tool.PLACEHOLDER_C
    assert not (site / "setup.py").exists() and not (package / "setup.py").exists()
    assert len(pip.commands) == 1 and os.listdir(cache) == [tool.SDIST_FILE]  # no temporary left

    tool.install(str(cache), str(site))  # the verified cache is reused: pip is not run again
    assert len(pip.commands) == 1


def test_wrong_checksum_is_refused_and_the_file_removed(tool, tmp_path, monkeypatch):
    sdist = tmp_path / "src" / tool.SDIST_FILE
    sdist.parent.mkdir()
    digest = _fake_sdist(sdist)  # SDIST_SHA256 stays the real sdist's
    monkeypatch.setattr(tool.subprocess, "run", _FakePip(sdist))
    cache, site = tmp_path / "cache", tmp_path / "site"
    with pytest.raises(SystemExit, match=f"SHA-256 {digest}, expected {tool.SDIST_SHA256}"):
        tool.install(str(cache), str(site))
    assert not (cache / tool.SDIST_FILE).exists() and not site.exists()


def test_pip_failure_and_unsafe_members_are_clear_errors(tool, tmp_path, monkeypatch):
    monkeypatch.setattr(tool.subprocess, "run", _FakePip(tmp_path / "none", returncode=1))
    with pytest.raises(SystemExit, match="pip could not download pb1-detectron2==0.6"):
        tool.install(str(tmp_path / "cache"), str(tmp_path / "site"))

    evil = tmp_path / "evil.tar.gz"
    _fake_sdist(evil, {"pb1-detectron2-0.6/detectron2/../../escaped.py": b"X = 2\n"})
    with pytest.raises(SystemExit, match="outside the package"):
        tool.extract_package(str(evil), str(tmp_path / "site" / "detectron2"))
    assert not (tmp_path / "escaped.py").exists()


def test_install_replaces_image_linear_gone_in_pillow_10(tool, tmp_path, monkeypatch):
    """v0.6's one use of Image.LINEAR (a default argument: importing detectron2.data fails on Pillow >= 10,
    the only Pillow for Python 3.12) becomes Image.BILINEAR, the same constant; an install is fixed once."""
    source = b"from PIL import Image\n\n\nclass T:\n    def __init__(self, r, s, interp=Image.LINEAR, fill=0):\n"
    sdist = tmp_path / "src" / tool.SDIST_FILE
    sdist.parent.mkdir()
    extra = {f"pb1-detectron2-0.6/detectron2/{tool.PILLOW_10_FILE}": source}
    monkeypatch.setattr(tool, "SDIST_SHA256", _fake_sdist(sdist, extra))
    package = Path(tool.install_package(str(sdist), str(tmp_path / "site")))
    fixed = (package / tool.PILLOW_10_FILE).read_text()
    assert fixed == source.decode().replace("interp=Image.LINEAR,", "interp=Image.BILINEAR,")
    assert not tool.fix_for_pillow_10(str(package))  # already fixed: unchanged
    assert tool.is_offline_install(str(package))
