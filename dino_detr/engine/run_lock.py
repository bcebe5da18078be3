"""One training run per ``OUTPUT_DIR``: a lock file holding the owner's pid and host."""

import atexit
import contextlib
import logging
import os
import socket
import time
from typing import Dict, Tuple

from detectron2.utils import comm

__all__ = ["OutputDirInUseError", "lock_output_dir"]

LOCK_NAME = "run.lock"

logger = logging.getLogger(__name__)

_held: Dict[str, str] = {}  # real path of the output folder -> lock file, held by this process


class OutputDirInUseError(RuntimeError):
    """Another live process trains into the same ``OUTPUT_DIR``."""


def _owner(lock: str) -> Tuple[int, str]:
    """(pid, host) written in ``lock``; (-1, "") when it is unreadable or half written."""
    with contextlib.suppress(OSError, ValueError):
        with open(lock) as f:
            pid, host = f.read().split()[:2]
            return int(pid), host
    return -1, ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _release(lock: str, mine: str) -> None:
    with contextlib.suppress(OSError):
        with open(lock) as f:
            if f.read() != mine:
                return
        os.unlink(lock)


def lock_output_dir(output_dir: str) -> None:
    """Take ``<output_dir>/run.lock`` for this process until it exits (main process only;
    again in the same process: no-op).

    A lock left by a dead process of this host is taken over (with a warning); a lock of a
    live process, or of another host, raises
    :class:`OutputDirInUseError` naming its owner and the file.
    """
    if not comm.is_main_process():
        return
    os.makedirs(output_dir, exist_ok=True)
    key = os.path.realpath(output_dir)
    if key in _held:
        return
    lock = os.path.join(output_dir, LOCK_NAME)
    host = socket.gethostname()
    mine = f"{os.getpid()} {host} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pid, owner_host = _owner(lock)
            if pid > 0 and owner_host == host and not _alive(pid):
                logger.warning(f"Taking over {lock}: its process {pid} on this host is gone")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)
                continue
            if pid > 0:
                who = f"process {pid} on {owner_host}"
                stale = "" if owner_host == host else f"; if it no longer runs on {owner_host}, delete {lock}"
            else:
                who, stale = "a starting run", f"; if none is starting, delete {lock}"
            raise OutputDirInUseError(
                f"OUTPUT_DIR {output_dir} is in use by {who} (lock file {lock}). Two runs into one folder would "
                f"overwrite each other's checkpoints: choose another OUTPUT_DIR or wait for that run to end{stale}."
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        _held[key] = lock
        atexit.register(_release, lock, mine)
        return
    raise OutputDirInUseError(f"could not take the lock {lock}: it keeps being re-created by other processes")
