"""Shared test set-up. Makes the tools' own modules (``tools/*.py``: the scripts and their helpers, such as
``visualization``) importable by the tests, as they are for a script run from ``tools/``."""

import os
import sys

import pytest

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)


@pytest.fixture
def cuda_emulation():
    """Factory of ``EmulatedCuda(max_blocks=...)``: the CUDA kernels compiled for the host
    (tests/cuda_emulation). Skips when the library is not built; fails instead under
    ``DINO_DETR_REQUIRE_CUDA_EMU=1``, as ``make test`` sets it."""
    from cuda_emulation.msda_emu import load_emulation

    return load_emulation
