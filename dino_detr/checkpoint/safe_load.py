"""Reading weight files without running code from them.

* ``.pkl`` (Detectron2 / Caffe2 model-zoo format: dicts of NumPy arrays, with optional
  ``"__author__"`` and ``"matching_heuristics"`` entries) is read by an unpickler that only
  reconstructs NumPy arrays, dtypes and scalars, ``OrderedDict`` and the builtin containers;
  any other global named in the file is refused.
* Every other file is a PyTorch file read with ``torch.load(weights_only=True)``.
* A file refused by these is loaded with Python's full unpickler only when it is listed in
  the environment variable ``DINO_DETR_TRUSTED_WEIGHTS`` (paths separated by ``os.pathsep``).
"""

import logging
import os
import pickle
from typing import Any, Iterable

import torch

__all__ = [
    "TRUSTED_WEIGHTS_ENV",
    "UnreadableCheckpointError",
    "UnsafeCheckpointError",
    "is_trusted",
    "load_pickled_arrays",
    "load_torch_weights",
]

TRUSTED_WEIGHTS_ENV = "DINO_DETR_TRUSTED_WEIGHTS"

logger = logging.getLogger(__name__)

# (module, name) of everything a pickled dict of NumPy arrays refers to: protocol 2 (Python 2
# era model zoo files, bytes via _codecs.encode), 3-4 (_reconstruct) and 5 (_frombuffer), for
# NumPy 1 ("numpy.core") and 2 ("numpy._core").
_ALLOWED_GLOBALS = frozenset(
    [(f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")]
    + [(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"), ("_codecs", "encode")]
)


class UnsafeCheckpointError(RuntimeError):
    """The file names something other than tensors / arrays and plain containers."""


class UnreadableCheckpointError(RuntimeError):
    """The file cannot be read at all (truncated, corrupt, not a checkpoint)."""


def _trust_hint(path: str) -> str:
    return (
        f"Only if you trust this file (loading it may run code stored in it), allow it with "
        f"{TRUSTED_WEIGHTS_ENV}={os.path.abspath(path)}"
    )


def is_trusted(path: str) -> bool:
    """Whether ``path`` is one of the files listed in ``DINO_DETR_TRUSTED_WEIGHTS`` (logged, since
    such a file is then read with Python's full unpickler)."""
    listed = [p for p in os.environ.get(TRUSTED_WEIGHTS_ENV, "").split(os.pathsep) if p]
    trusted = os.path.realpath(path) in {os.path.realpath(p) for p in listed}
    if trusted:
        logger.warning(f"{path} is listed in {TRUSTED_WEIGHTS_ENV}: loading it with Python's full unpickler")
    return trusted


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafeCheckpointError(f"refused global '{module}.{name}'")
        return super().find_class(module, name)


def load_pickled_arrays(path: str) -> Any:
    """The content of a ``.pkl`` weight file, allowing only NumPy arrays and containers
    (any content when the file is trusted).

    Raises:
        UnsafeCheckpointError: naming the file and the refused global (nothing was executed).
        UnreadableCheckpointError: the file is truncated or not a pickle.
    """
    with open(path, "rb") as f:
        if is_trusted(path):
            return pickle.load(f, encoding="latin1")
        try:
            return _ArrayUnpickler(f, encoding="latin1").load()
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(
                f"{path}: {e}: a .pkl weight file may only hold NumPy arrays in dicts/lists. {_trust_hint(path)}"
            ) from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise UnreadableCheckpointError(f"{path}: not a readable pickle file ({type(e).__name__}: {e})") from e


def _refusal_reason(message: str) -> str:
    """The specific line of torch's weights-only error (what it refused), without its
    generic paragraphs."""
    for line in message.splitlines():
        line = line.partition("WeightsUnpickler error:")[2] or line
        line = line.strip().rstrip(".")
        if line and not line.startswith(("Weights only load failed", "Check the documentation", "Please file")):
            return line
    return message.strip()


def load_torch_weights(path: str, safe_globals: Iterable[type] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU (``safe_globals``: plain-data classes
    to allow besides tensors and containers); ``weights_only=False`` when the file is trusted.

    Raises:
        UnsafeCheckpointError: the file needs globals the safe loader refuses (names the file,
            what was refused and the opt-in for trusted files).
        UnreadableCheckpointError: the file is truncated or not a PyTorch file.
    """
    if is_trusted(path):
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _refusal_reason(str(e))
        raise UnsafeCheckpointError(
            f"{path}: refused by torch.load(weights_only=True): {refused}. {_trust_hint(path)}"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise UnreadableCheckpointError(f"{path}: not a readable PyTorch file ({type(e).__name__}: {e})") from e
