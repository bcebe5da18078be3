"""Shared test set-up. Makes the tools' own modules (``tools/*.py``: the scripts and their helpers, such as
``visualization``) importable by the tests, as they are for a script run from ``tools/``."""

import os
import shutil
import sys
import tempfile

import pytest
import torch

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)


#: The temporary folder's space the whole suite needs at its peak (1.2 GiB measured): each test's files are
#: removed when it passes (pyproject.toml), the ~11 GB written over a run never add up.
SUITE_TMP_GIB = 2.0


def pytest_sessionstart(session):
    """Says so, before any test, when the temporary folder has less free space than the suite needs (the
    checkpoint tests would fail with ``OSError: cannot write ...``)."""
    folder = tempfile.gettempdir()
    free_gib = shutil.disk_usage(folder).free / 2**30
    if free_gib < SUITE_TMP_GIB:
        session.config.get_terminal_writer().line(
            f"WARNING: {folder} has {free_gib:.1f} GiB free; the whole suite needs about {SUITE_TMP_GIB:.0f} GiB "
            "there (set TMPDIR to a folder with more)",
            yellow=True,
        )


def _threads_for(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def at_most_two_threads():
    """At most two CPU threads for a module's trainings (as on CI's 2 cores, whatever the machine)."""
    yield from _threads_for(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread():
    """Bitwise reproducible CPU kernels for the duration of a test."""
    yield from _threads_for(1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The CI dataset (train_utils.ci_dataset), generated and registered once; its training split's name."""
    from train_utils import ci_dataset

    return ci_dataset(tmp_path_factory.mktemp("ci_data") / "shapes")


@pytest.fixture
def cuda_emulation():
    """Factory of ``EmulatedCuda(max_blocks=...)``: the CUDA kernels compiled for the host
    (tests/cuda_emulation). Skips when the library is not built; fails instead under
    ``DINO_DETR_REQUIRE_CUDA_EMU=1``, as ``make test`` sets it."""
    from cuda_emulation.msda_emu import load_emulation

    return load_emulation
