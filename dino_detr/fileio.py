"""Crash-safe file writing, shared by checkpoints, the dataset check cache and the MSDA kernel cache."""

import contextlib
import os
import uuid
from typing import IO, Iterator

__all__ = ["atomic_open"]


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[IO]:
    """A file object whose content replaces ``path`` only once it is completely written.

    Writes a hidden temporary file in the same folder, flushes and fsyncs it, renames it
    over ``path`` (atomic on POSIX) and fsyncs the folder. On any error (or a crash) ``path``
    keeps its previous content and the temporary file is removed (or left hidden).
    """
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power loss
    finally:
        os.close(fd)
