"""Published DINO weights by name: the one table (``PUBLISHED_WEIGHTS``) and the ``dino_detr://``
``PathManager`` handler that resolves a name to a verified local file.

``dino_detr://detrex/dino_r50_4scale_12ep`` works wherever Detectron2 takes a path
(``MODEL.WEIGHTS``, ``DetectionCheckpointer.load``, ``PathManager.get_local_path``): the file is
downloaded once through Detectron2's ``PathManager`` (cache, progress bar, hash checks: see
``download.py``) and converted on load (``layouts.py``).

The official DINO publishes only Google Drive / Baidu folders: its entries have no URL; the file is
placed by hand at ``<cache>/dino_detr/official/<file>`` (the error says where), then found by name.

``DINO_DETR_WEIGHTS_MIRROR=http://host:port/prefix``: download the table's files from a mirror that
serves them under ``<prefix>/<original host>/<original path>`` (an internal mirror; the tests' local
server). Given URLs and paths are not affected.
"""

import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple
from urllib.parse import urlparse

from detectron2.utils.file_io import PathHandler, PathManager
from iopath.common.file_io import get_cache_dir

from .convert import _BOX_PREDICTION_EPS, _POSITION_EMBEDDING
from .download import WeightsDownloadError, verify_file

__all__ = [
    "MIRROR_ENV",
    "PUBLISHED_WEIGHTS",
    "PublishedWeights",
    "PublishedWeightsHandler",
    "UnknownWeightsError",
    "published_weights",
    "register_weight_handlers",
]

MIRROR_ENV = "DINO_DETR_WEIGHTS_MIRROR"
PREFIX = "dino_detr://"

_DETREX = "https://github.com/IDEA-Research/detrex-storage/releases/download/"
_DETREX_PAGE = "https://github.com/IDEA-Research/detrex/blob/main/projects/dino/README.md"
_MMDET = "https://download.openmmlab.com/mmdetection/v3.0/dino/"
_MMDET_PAGE = "https://github.com/open-mmlab/mmdetection/blob/main/configs/dino/README.md"
# Where mmdetection's metafile links its 36-epoch Swin-L DINO (a contributor's release, not its own storage).
_MMDET_SWINL_36E = "https://github.com/RistoranteRist/mmlab-weights/releases/download/dino-swinl/"
_OFFICIAL_PAGE = "https://drive.google.com/drive/folders/1qD5m1NmK0kjE5hh-G17XUX751WsEG-h_"
_OFFICIAL_BAIDU = "https://pan.baidu.com/s/1St5rvfgfPwpnPuf_Oe6DpQ (code: DINO)"

# Config options of this project that reproduce each source's model (what the converter infers).
_PER_LAYER_HEADS = ("MODEL.DINO.DEC_PRED_CLASS_EMBED_SHARE", "False", "MODEL.DINO.DEC_PRED_BBOX_EMBED_SHARE", "False")
# detrex's and mmdetection's "improved" PositionEmbeddingSine(temperature=10000, offset=-0.5)
_TEMPERATURE, _OFFSET = (str(v) for v in _POSITION_EMBEDDING["detrex"])
_PE_10000 = ("MODEL.DINO.PE_TEMPERATURE_H", _TEMPERATURE, "MODEL.DINO.PE_TEMPERATURE_W", _TEMPERATURE)
_PE_10000 += ("MODEL.DINO.PE_OFFSET", _OFFSET)
_DETREX_OPTS = _PER_LAYER_HEADS + _PE_10000
# mmdetection's head: per-layer heads, inverse sigmoid floored at 1e-5 in the box prediction
_MMDET_OPTS = _PER_LAYER_HEADS + ("MODEL.DINO.BOX_PREDICTION_EPS", f"{_BOX_PREDICTION_EPS['mmdet']:g}")


@dataclass(frozen=True)
class PublishedWeights:
    """One published checkpoint.

    Attributes:
        name: ``<source>/<name>``, used as ``dino_detr://<name>``.
        source: the layout: ``official``, ``detrex`` or ``mmdet``.
        url: direct download address; ``None`` where the source publishes a folder only.
        file_name: the file's published name.
        config: this project's config file the weights fit, plus ``opts`` on top of it.
        box_ap: COCO val2017 box AP published by the source.
        sha256: the published SHA-256 or its prefix (mmdetection: the file name's last 8 hex digits).
        page: where the source publishes it.
    """

    name: str
    source: str
    url: Optional[str]
    file_name: str
    config: str
    opts: Tuple[str, ...]
    box_ap: float
    sha256: Optional[str]
    page: str


def _detrex(name: str, release: str, file_name: str, config: str, box_ap: float, opts=()) -> PublishedWeights:
    return PublishedWeights(
        f"detrex/{name}", "detrex", f"{_DETREX}{release}/{file_name}", file_name, config,
        _DETREX_OPTS + tuple(opts), box_ap, None, _DETREX_PAGE,
    )  # fmt: skip


def _mmdet(
    name: str, stamp: Optional[str], sha256: str, config: str, box_ap: float, opts=(), folder: Optional[str] = None
) -> PublishedWeights:
    """mmdetection's ``{name}_{stamp}-{sha256}.pth`` in its storage's ``{name}/`` folder, or, for a file its
    metafile links elsewhere, ``{name}-{sha256}.pth`` (no time stamp) in ``folder``."""
    file_name = f"{name}_{stamp}-{sha256}.pth" if stamp else f"{name}-{sha256}.pth"
    url = f"{folder or _MMDET + name + '/'}{file_name}"
    return PublishedWeights(
        f"mmdet/{name}", "mmdet", url, file_name, config, _MMDET_OPTS + tuple(opts), box_ap, sha256, _MMDET_PAGE
    )


def _official(name: str, file_name: str, config: str, box_ap: float) -> PublishedWeights:
    page = f"{_OFFICIAL_PAGE} or {_OFFICIAL_BAIDU}"
    return PublishedWeights(f"official/{name}", "official", None, file_name, config, (), box_ap, None, page)


_R50_4, _R50_5, _R101_4 = (
    "configs/dino_r50_4scale.yaml",
    "configs/dino_r50_5scale.yaml",
    "configs/dino_r101_4scale.yaml",
)
_SWINL_4, _SWINL_5 = "configs/dino_swinl_4scale.yaml", "configs/dino_swinl_5scale.yaml"

#: name -> entry. Sources: detrex ``projects/dino/README.md`` (ResNet and Swin tables), mmdetection
#: ``configs/dino/metafile.yml``, official DINO ``README.md`` (model zoo, 12/24/36 epochs).
PUBLISHED_WEIGHTS: Dict[str, PublishedWeights] = {
    w.name: w
    for w in [
        _detrex("dino_r50_4scale_12ep", "v0.2.0", "dino_r50_4scale_12ep_49_2AP.pth", _R50_4, 49.2),
        _detrex(
            "dino_r50_4scale_12ep_300dn",
            "v0.2.0",
            "dino_r50_4scale_12ep_300dn.pth",
            _R50_4,
            49.5,
            ("MODEL.DINO.DN_NUMBER", "300"),
        ),  # fmt: skip
        _detrex("dino_r50_4scale_24ep", "v0.1.1", "dino_r50_4scale_24ep.pth", _R50_4, 50.6),
        _detrex("dino_r50_5scale_12ep", "v0.2.1", "dino_r50_5scale_12ep.pth", _R50_5, 49.6),
        _detrex("dino_r101_4scale_12ep", "v0.1.1", "dino_r101_4scale_12ep.pth", _R101_4, 50.0),
        _detrex("dino_swin_large_384_4scale_12ep", "v0.1.1", "dino_swin_large_4scale_12ep.pth", _SWINL_4, 56.9),
        _detrex("dino_swin_large_384_5scale_12ep", "v0.2.1", "dino_swin_large_384_5scale_12ep.pth", _SWINL_5, 57.5),
        _detrex("dino_swin_large_384_4scale_36ep", "v0.2.0", "dino_swin_large_384_4scale_36ep.pth", _SWINL_4, 58.1),
        _detrex("dino_swin_large_384_5scale_36ep", "v0.2.1", "dino_swin_large_384_5scale_36ep.pth", _SWINL_5, 58.5),
        _mmdet("dino-4scale_r50_8xb2-12e_coco", "20221202_182705", "55b2bba2", _R50_4, 49.0),
        _mmdet(
            "dino-4scale_r50_improved_8xb2-12e_coco",
            "20230818_162607",
            "6f47a913",
            _R50_4,
            50.1,
            _PE_10000 + ("MODEL.DINO.DN_NUMBER", "300"),
        ),  # fmt: skip
        _mmdet("dino-5scale_swin-l_8xb2-12e_coco", "20230228_072924", "a654145f", _SWINL_5, 57.2),
        _mmdet("dino-5scale_swin-l_8xb2-36e_coco", None, "5486e051", _SWINL_5, 58.4, folder=_MMDET_SWINL_36E),
        _official("dino_r50_4scale_12ep", "checkpoint0011_4scale.pth", _R50_4, 49.0),
        _official("dino_r50_4scale_24ep", "checkpoint0023_4scale.pth", _R50_4, 50.4),
        _official("dino_r50_4scale_36ep", "checkpoint0033_4scale.pth", _R50_4, 50.9),
        _official("dino_r50_5scale_12ep", "checkpoint0011_5scale.pth", _R50_5, 49.4),
        _official("dino_r50_5scale_24ep", "checkpoint0023_5scale.pth", _R50_5, 51.3),
        _official("dino_r50_5scale_36ep", "checkpoint0033_5scale.pth", _R50_5, 51.2),
    ]
}


class UnknownWeightsError(KeyError):
    """A name not in :data:`PUBLISHED_WEIGHTS` (the message lists the known ones, one per line)."""

    def __str__(self) -> str:
        return str(self.args[0])


def published_weights(name: str) -> PublishedWeights:
    """The table entry of ``name`` (with or without ``dino_detr://``).

    Raises:
        UnknownWeightsError: (a ``KeyError``) listing the known names.
    """
    key = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    if key not in PUBLISHED_WEIGHTS:
        known = "\n  ".join(PUBLISHED_WEIGHTS)
        raise UnknownWeightsError(f"unknown published weights {name!r}; known names (dino_detr://<name>):\n  {known}")
    return PUBLISHED_WEIGHTS[key]


def download_url(entry: PublishedWeights) -> str:
    """The entry's URL, or its address on the mirror named by ``DINO_DETR_WEIGHTS_MIRROR``."""
    mirror = os.environ.get(MIRROR_ENV, "").rstrip("/")
    if not mirror:
        return entry.url
    parsed = urlparse(entry.url)
    return f"{mirror}/{parsed.netloc}{parsed.path}"


def manual_path(entry: PublishedWeights, cache_dir: Optional[str] = None) -> str:
    """Where a file that cannot be downloaded directly is placed by hand."""
    return os.path.join(get_cache_dir(cache_dir), "dino_detr", entry.source, entry.file_name)


class PublishedWeightsHandler(PathHandler):
    """``dino_detr://<source>/<name>`` -> the verified local file of :data:`PUBLISHED_WEIGHTS`
    (Detectron2's ``ModelCatalogHandler`` style)."""

    def _get_supported_prefixes(self):
        return [PREFIX]

    def _get_local_path(self, path: str, cache_dir: Optional[str] = None, **kwargs: Any) -> str:
        entry = published_weights(path)
        if entry.url is not None:
            return PathManager.get_local_path(download_url(entry), cache_dir=cache_dir, sha256=entry.sha256, **kwargs)
        local = manual_path(entry, cache_dir)
        if not os.path.isfile(local):
            raise WeightsDownloadError(
                f"{path}: the {entry.source} project publishes {entry.file_name} only in a folder, not as a direct "
                f"download. Download it from {entry.page} and place it at {local} (then this name finds it), or "
                "give the file's path as MODEL.WEIGHTS: it is converted on load."
            )
        verify_file(local, path, entry.sha256)
        return local

    def _open(self, path: str, mode: str = "r", **kwargs: Any):
        if "b" not in mode:
            raise ValueError(
                f"{path} names published weights, a binary file: open it with mode 'rb', not {mode!r}. Its config "
                "file is dino_detr.config_file_path(name) (what --config-file dino_detr://<name> reads)."
            )
        return PathManager.open(self._get_local_path(path), mode, **kwargs)


def register_weight_handlers() -> None:
    """Registers ``dino_detr://`` and the verifying HTTP handler in Detectron2's ``PathManager``
    (idempotent; called when ``dino_detr.checkpoint`` is imported)."""
    from .download import VerifiedHTTPURLHandler

    handlers = PathManager._path_handlers
    if not isinstance(handlers.get("https://"), VerifiedHTTPURLHandler):
        PathManager.register_handler(VerifiedHTTPURLHandler(), allow_override=True)
    if PREFIX not in handlers:
        PathManager.register_handler(PublishedWeightsHandler())
