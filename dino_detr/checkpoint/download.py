"""Downloads a user can trust: iopath's ``HTTPURLHandler`` (what Detectron2's ``PathManager`` uses
for every URL: its cache under ``$FVCORE_CACHE`` or ``~/.torch/iopath_cache``, proxies through
``urllib``, a progress bar, a temporary file renamed only when complete) plus hash checks.

* A hash given by the caller (the published-weights table: mmdetection publishes the SHA-256's
  first hex digits in its file names) is checked after the download; a mismatch deletes the file
  and names the URL, the expected and the actual hash. Other URLs' file names are not read as hashes.
* The full SHA-256 of what was first downloaded is kept beside the cached file (``<file>.sha256``,
  ``sha256sum`` format) and checked on every later load: a cached file that changed is deleted.
  A first download with no published hash is trusted (one warning names the file and its SHA-256).
* A failed download (no network, interrupted) raises :class:`WeightsDownloadError` naming the URL
  and where to place the file by hand; an interrupted download leaves nothing in the cache.
"""

import hashlib
import logging
import os
from typing import Any, Optional
from urllib.parse import urlparse

from iopath.common.file_io import HTTPURLHandler, get_cache_dir

from .io import atomic_open

__all__ = ["ChecksumError", "VerifiedHTTPURLHandler", "WeightsDownloadError", "cache_path", "sha256_of"]

logger = logging.getLogger(__name__)


class WeightsDownloadError(OSError):
    """A weight file could not be downloaded (no network, refused, interrupted)."""


class ChecksumError(RuntimeError):
    """A downloaded or cached weight file does not have the expected SHA-256."""


def sha256_of(path: str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_path(url: str, cache_dir: Optional[str] = None) -> str:
    """Where iopath's ``HTTPURLHandler`` caches ``url`` (``<cache>/<URL path>``)."""
    return os.path.join(get_cache_dir(cache_dir), urlparse(url).path.lstrip("/"))


def verify_file(path: str, origin: str, expected_sha256: Optional[str] = None) -> str:
    """Checks ``path`` against the SHA-256 recorded beside it, or, on first use, against
    ``expected_sha256`` (a full hash or a prefix) and then records it. Returns the hash.

    Raises:
        ChecksumError: naming ``origin``, the expected and the actual hash (the file is deleted).
    """
    actual = sha256_of(path)
    sidecar = path + ".sha256"
    if os.path.isfile(sidecar):
        with open(sidecar) as f:
            recorded = f.read().split()[0]
        if actual != recorded:
            _remove(path, sidecar)
            raise ChecksumError(
                f"{path} (from {origin}) changed since it was first downloaded: SHA-256 {actual}, recorded "
                f"{recorded}. The file was deleted; the next load downloads it again."
            )
        return actual
    if expected_sha256 and not actual.startswith(expected_sha256.lower()):
        _remove(path)
        raise ChecksumError(
            f"{origin}: SHA-256 of the download is {actual}, expected {expected_sha256}"
            f"{' (prefix)' if len(expected_sha256) < 64 else ''}. The file was deleted ({path})."
        )
    with atomic_open(sidecar, "w") as f:
        f.write(f"{actual}  {os.path.basename(path)}\n")
    if expected_sha256:
        logger.info(f"{path}: SHA-256 {actual} matches the published {expected_sha256}, recorded in {sidecar}")
    else:
        logger.warning(
            f"{path} (from {origin}): its source publishes no hash, so this first download is trusted; its SHA-256 "
            f"{actual} is recorded in {sidecar} and checked on every later load"
        )
    return actual


def _remove(*paths: str) -> None:
    for p in paths:
        if os.path.exists(p):
            os.remove(p)


class VerifiedHTTPURLHandler(HTTPURLHandler):
    """iopath's ``HTTPURLHandler`` with hash checks and clear download errors (see the module
    docstring). Registered for ``http://``, ``https://`` and ``ftp://`` in Detectron2's
    ``PathManager`` when ``dino_detr`` is imported.

    ``get_local_path(url, sha256=...)``: a published full hash or hash prefix to check the first
    download against (the table passes the ones its sources publish; without it nothing is checked
    but the recorded hash of later loads).
    """

    def _get_local_path(
        self,
        path: str,
        force: bool = False,
        cache_dir: Optional[str] = None,
        sha256: Optional[str] = None,
        **kwargs: Any,
    ) -> str:
        try:
            local = super()._get_local_path(path, force=force, cache_dir=cache_dir, **kwargs)
        except OSError as e:
            raise WeightsDownloadError(
                f"cannot download {path}: {getattr(e, 'reason', None) or e}. Nothing was cached. Without network "
                f"access, download the file elsewhere and place it at {cache_path(path, cache_dir)} (Detectron2's "
                "download cache: $FVCORE_CACHE, default ~/.torch/iopath_cache), or give its local path instead."
            ) from e
        verify_file(local, path, sha256)
        return local
