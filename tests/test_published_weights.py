"""Published weights by name, URL or path without the internet: a local HTTP server on 127.0.0.1
serves synthesized checkpoints of each layout (random tensors with the exact names and shapes of
``tests/manifests``). The table's URLs reach it through ``DINO_DETR_WEIGHTS_MIRROR`` (the documented
seam); Detectron2's download cache is a temporary folder (``FVCORE_CACHE``)."""

import dataclasses
import hashlib
import http.server
import io
import logging
import os
import re
import sys
import threading

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager
from PIL import Image
from test_convert_checkpoint import random_checkpoint

from dino_detr import get_dino_cfg, model_zoo
from dino_detr.checkpoint import (
    MIRROR_ENV,
    PUBLISHED_WEIGHTS,
    ChecksumError,
    SafeCheckpointer,
    WeightsDownloadError,
    convert_state_dict,
    is_class_dependent,
    mmdet_source_config,
    published_weights,
)
from dino_detr.checkpoint.zoo import manual_path
from dino_detr.modeling.swin import relative_position_index

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DETREX = "detrex/dino_r50_4scale_12ep"
MMDET = "mmdet/dino-4scale_r50_8xb2-12e_coco"
MMDET_SWINL = "mmdet/dino-5scale_swin-l_8xb2-12e_coco"
OFFICIAL = "official/dino_r50_4scale_12ep"
# The smallest inputs with enough encoder tokens (> 900) for the published models' 900 queries.
SMALL_IMAGE = ["INPUT.MIN_SIZE_TEST", "192", "INPUT.MAX_SIZE_TEST", "256", "MODEL.DEVICE", "cpu"]


class _Files(http.server.BaseHTTPRequestHandler):
    """GET <path>: the bytes registered for it (``files``); paths in ``truncate`` send the full
    Content-Length but only half the body, then close (an interrupted download)."""

    files, truncate, requests = {}, set(), []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).requests.append(self.path)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if self.path in self.truncate else body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    """``http://127.0.0.1:<port>``, serving ``_Files`` from a thread (stopped after the module)."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    httpd.timeout = 10
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture
def cache(tmp_path, monkeypatch, server):
    """An empty download cache, the table pointed at the local server, no remembered downloads."""
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(MIRROR_ENV, server + "/mirror")
    _forget_downloads()
    _Files.files, _Files.truncate, _Files.requests = {}, set(), []
    return tmp_path / "cache"


def _forget_downloads():
    """What a new process starts with: iopath's in-process map of downloaded URLs is empty."""
    PathManager._path_handlers["https://"].cache_map.clear()


def _serve(url_or_entry, data: bytes) -> str:
    """Serves ``data`` at the mirror address of a table entry (or at a server path); returns the path."""
    if isinstance(url_or_entry, str):
        path = url_or_entry
    else:
        path = "/mirror/" + url_or_entry.url.split("://", 1)[1]
    _Files.files[path] = data
    return path


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ----------------------------------------------------------------------------- the table and names


def test_table_entries_are_complete():
    for name, w in PUBLISHED_WEIGHTS.items():
        assert name == w.name and name.startswith(w.source + "/")
        assert os.path.isfile(os.path.join(REPO, w.config)), w.config
        assert 40 < w.box_ap < 60
        if w.source == "official":
            assert w.url is None and "drive.google.com" in w.page
        else:
            assert w.url.startswith("https://") and w.url.endswith("/" + w.file_name)
        if w.source == "mmdet":  # the published prefix is the file name's last 8 hex digits
            assert w.file_name.endswith(f"-{w.sha256}.pth") and len(w.sha256) == 8
    assert {w.source for w in PUBLISHED_WEIGHTS.values()} == {"official", "detrex", "mmdet"}


def test_unknown_name_lists_the_known_ones(cache):
    with pytest.raises(KeyError, match=r"(?s)detrex/dino_r50_4scale_nope.*detrex/dino_r50_4scale_12ep.*mmdet/"):
        PathManager.get_local_path("dino_detr://detrex/dino_r50_4scale_nope")
    with pytest.raises(KeyError, match="known names"):
        model_zoo.get_config("nope")


def test_config_of_a_name():
    cfg = model_zoo.get_config(DETREX)
    assert cfg.MODEL.WEIGHTS == "dino_detr://" + DETREX
    assert (cfg.MODEL.DINO.PE_TEMPERATURE_H, cfg.MODEL.DINO.PE_OFFSET) == (10000, -0.5)
    assert cfg.MODEL.DINO.DEC_PRED_CLASS_EMBED_SHARE is False
    # the same through --config-file in every tool
    assert get_dino_cfg("dino_detr://" + DETREX, ["MODEL.DEVICE", "cpu"]).MODEL.DINO.PE_OFFSET == -0.5
    assert model_zoo.get_config(MMDET, trained=False).MODEL.WEIGHTS == ""


# Table entries -> the manifest of their layout (R101: the R50 names with 23 res4 blocks, not kept).
_MANIFEST_OF = {
    "detrex/dino_r50_4scale_12ep": "detrex_dino_r50_4scale",
    "detrex/dino_r50_4scale_12ep_300dn": "detrex_dino_r50_4scale",
    "detrex/dino_r50_4scale_24ep": "detrex_dino_r50_4scale",
    "detrex/dino_r50_5scale_12ep": "detrex_dino_r50_5scale",
    "detrex/dino_swin_large_384_4scale_12ep": "detrex_dino_swinl_4scale",
    "detrex/dino_swin_large_384_5scale_12ep": "detrex_dino_swinl_5scale",
    "detrex/dino_swin_large_384_4scale_36ep": "detrex_dino_swinl_4scale",
    "detrex/dino_swin_large_384_5scale_36ep": "detrex_dino_swinl_5scale",
    "mmdet/dino-4scale_r50_8xb2-12e_coco": "mmdet_dino_r50_4scale",
    "mmdet/dino-4scale_r50_improved_8xb2-12e_coco": "mmdet_dino_r50_4scale",
    "mmdet/dino-5scale_swin-l_8xb2-12e_coco": "mmdet_dino_swinl_5scale",
    "mmdet/dino-5scale_swin-l_8xb2-36e_coco": "mmdet_dino_swinl_5scale",
    "official/dino_r50_4scale_12ep": "official_dino_r50_4scale",
    "official/dino_r50_5scale_36ep": "official_dino_r50_5scale",
}


def _with_index_buffers(sd):
    """The Swin ``relative_position_index`` buffers as the source models compute them (checked on conversion)."""
    for key in [k for k in sd if k.endswith("relative_position_index")]:
        sd[key] = relative_position_index(int(sd[key].shape[0] ** 0.5))
    return sd


@pytest.mark.parametrize("name", sorted(_MANIFEST_OF))
def test_table_config_is_what_the_weights_need(name):
    """The table's config + options have every value the converter reads off the weights."""
    sd = _with_index_buffers(random_checkpoint(_MANIFEST_OF[name]))
    entry = published_weights(name)
    source_config = {}
    if "improved" in name:  # read from the config text mmdetection stores in the checkpoint
        source_config = mmdet_source_config(
            {"cfg": "positional_encoding=dict(num_feats=128, offset=-0.5, temperature=10000)"}
        )
    conversion = convert_state_dict(sd, entry.source, source_config=source_config)
    assert conversion.base_config == entry.config
    cfg = model_zoo.get_config(name)
    for key, value in conversion.config.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert (list(node) if isinstance(node, tuple) else node) == value, (key, node, value)


# ----------------------------------------------------------------------------- downloads


def test_download_is_cached_and_reused_without_a_request(cache, caplog):
    entry = published_weights(DETREX)
    data = b"weights" * 1000
    path = _serve(entry, data)
    with caplog.at_level(logging.WARNING, logger="dino_detr.checkpoint.download"):
        local = PathManager.get_local_path("dino_detr://" + DETREX)
    sha = hashlib.sha256(data).hexdigest()
    trusted = [r.getMessage() for r in caplog.records if "publishes no hash" in r.getMessage()]
    assert len(trusted) == 1 and local in trusted[0] and sha in trusted[0]  # trust on first use, visibly
    assert open(local, "rb").read() == data and local.startswith(str(cache))
    with open(local + ".sha256") as f:  # the full hash of the first download, beside the file
        assert f.read().split()[0] == hashlib.sha256(data).hexdigest()
    _forget_downloads()  # a later run
    assert PathManager.get_local_path("dino_detr://" + DETREX) == local
    assert _Files.requests == [path]  # one request for both loads


def test_given_hash_is_checked_not_a_file_name_that_looks_like_one(cache, server):
    data = b"x" * 5000
    dated = f"{server}/m/dino-20240101.pth"  # any URL: 8 hex digits in its name are not a hash
    _serve("/m/dino-20240101.pth", data)
    assert open(PathManager.get_local_path(dated), "rb").read() == data
    _serve("/m/model.pth", data)
    url = f"{server}/m/model.pth"
    with pytest.raises(ChecksumError) as e:  # the table passes the hashes its sources publish
        PathManager.get_local_path(url, sha256="0badc0de")
    assert url in str(e.value) and "0badc0de" in str(e.value) and hashlib.sha256(data).hexdigest() in str(e.value)
    assert not os.path.exists(cache / "m" / "model.pth")  # deleted
    assert open(PathManager.get_local_path(url, sha256=hashlib.sha256(data).hexdigest()[:8]), "rb").read() == data


# mmdetection's own storage; a contributor's GitHub release, linked from mmdetection's metafile
@pytest.mark.parametrize("name", [MMDET, "mmdet/dino-5scale_swin-l_8xb2-36e_coco"])
def test_table_hash_is_checked(name, cache, monkeypatch):
    entry = published_weights(name)  # its published prefix does not match these bytes
    _serve(entry, b"not the published file")
    with pytest.raises(ChecksumError, match=f"expected {entry.sha256}"):
        PathManager.get_local_path("dino_detr://" + name)
    data = b"a file with the published prefix"
    monkeypatch.setitem(
        PUBLISHED_WEIGHTS, name, dataclasses.replace(entry, sha256=hashlib.sha256(data).hexdigest()[:8])
    )
    _serve(entry, data)
    assert open(PathManager.get_local_path("dino_detr://" + name), "rb").read() == data


def test_changed_cached_file_is_detected(cache):
    _serve(published_weights(DETREX), b"a" * 100)
    local = PathManager.get_local_path("dino_detr://" + DETREX)
    with open(local, "ab") as f:
        f.write(b"tampered")
    _forget_downloads()
    with pytest.raises(ChecksumError, match="changed since it was first downloaded"):
        PathManager.get_local_path("dino_detr://" + DETREX)
    assert not os.path.exists(local)
    assert open(PathManager.get_local_path("dino_detr://" + DETREX), "rb").read() == b"a" * 100  # downloaded again


def test_interrupted_download_is_never_used(cache):
    path = _serve(published_weights(DETREX), b"b" * 200_000)
    _Files.truncate.add(path)
    with pytest.raises(WeightsDownloadError, match="cannot download"):
        PathManager.get_local_path("dino_detr://" + DETREX)
    leftovers = [os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs if not f.endswith(".lock")]
    assert leftovers == []  # neither the file nor a temporary one
    _Files.truncate.clear()
    assert len(open(PathManager.get_local_path("dino_detr://" + DETREX), "rb").read()) == 200_000


def test_no_network_names_the_url_and_where_to_put_the_file(cache, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, "http://127.0.0.1:9")  # discard port: connection refused
    with pytest.raises(WeightsDownloadError) as e:
        PathManager.get_local_path("dino_detr://" + DETREX)
    msg = str(e.value)
    assert "http://127.0.0.1:9/github.com/IDEA-Research/detrex-storage" in msg and str(cache) in msg
    assert "place it at" in msg


def test_official_weights_are_placed_by_hand(cache):
    entry = published_weights(OFFICIAL)
    with pytest.raises(WeightsDownloadError, match="drive.google.com.*place it at"):
        PathManager.get_local_path("dino_detr://" + OFFICIAL)
    os.makedirs(os.path.dirname(manual_path(entry)))
    with open(manual_path(entry), "wb") as f:
        f.write(b"c" * 10)
    assert PathManager.get_local_path("dino_detr://" + OFFICIAL) == manual_path(entry)
    assert os.path.isfile(manual_path(entry) + ".sha256")


# ----------------------------------------------------------------------------- layouts on load

_MMDET_CFG = "positional_encoding=dict(temperature=20)"
_LAYOUTS = {  # name -> (manifest, what the file holds besides the weights)
    OFFICIAL: ("official_dino_r50_4scale", lambda sd: {"model": sd, "epoch": 11}),
    DETREX: ("detrex_dino_r50_4scale", lambda sd: {"model": sd}),
    MMDET: ("mmdet_dino_r50_4scale", lambda sd: {"meta": {"cfg": _MMDET_CFG}, "state_dict": sd}),
    MMDET_SWINL: ("mmdet_dino_swinl_5scale", lambda sd: {"meta": {"cfg": _MMDET_CFG}, "state_dict": sd}),
}


def _publish(name, cache):
    """Synthesizes the checkpoint of ``name`` (random tensors, the manifest's exact names and shapes),
    puts it where the name finds it (local server; official: placed by hand) and returns the tensors."""
    manifest, wrap = _LAYOUTS[name]
    # small weights and positive BatchNorm variances: a network whose outputs stay finite
    sd = {
        k: v.abs() + 0.5 if k.endswith("running_var") else v * 0.05 for k, v in random_checkpoint(manifest, 3).items()
    }
    data = _saved(wrap(_with_index_buffers(sd)))
    entry = published_weights(name)
    if entry.url is None:
        os.makedirs(os.path.dirname(manual_path(entry)), exist_ok=True)
        with open(manual_path(entry), "wb") as f:
            f.write(data)
    else:
        _serve(entry, data)
    return sd, hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("name", [OFFICIAL, DETREX, MMDET, MMDET_SWINL])
def test_each_layout_loads_by_name_with_every_tensor_used(name, cache, monkeypatch, caplog):
    sd, sha = _publish(name, cache)
    entry = published_weights(name)
    if entry.sha256:  # the synthesized file is not the published one: the table names its hash
        monkeypatch.setitem(PUBLISHED_WEIGHTS, name, dataclasses.replace(entry, sha256=sha[:8]))
    cfg = model_zoo.get_config(name, opts=["MODEL.DEVICE", "cpu"])
    model = build_model(cfg).eval()
    with caplog.at_level(logging.INFO, logger="dino_detr.checkpoint.layouts"):
        SafeCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    line = [r.getMessage() for r in caplog.records if "converted in memory" in r.getMessage()]
    assert len(line) == 1 and f"{entry.source} DINO checkpoint, {len(sd)} tensors" in line[0]
    expected = convert_state_dict(sd, entry.source).state_dict
    model_sd = model.state_dict()
    assert set(model_sd) == set(expected)  # every model tensor comes from the file ...
    for k, v in model_sd.items():
        assert torch.equal(v, expected[k]), k
    by_shape = {}
    for v in model_sd.values():
        by_shape.setdefault(tuple(v.shape), []).append(v)
    # ... and every file tensor reaches the model (class rows: test_convert_checkpoint; mmdetection's patch
    # merging, whose channels are permuted: test_swin_convert; counters and Swin index buffers: not weights)
    for k, v in sd.items():
        class_rows = is_class_dependent(k.removeprefix("transformer.decoder.")) or k.startswith("dn_query_generator.")
        permuted = re.match(r"backbone\.stages\.\d+\.downsample\.", k)
        if not (class_rows or permuted or k.endswith(("num_batches_tracked", "relative_position_index"))):
            assert any(torch.equal(v, t) for t in by_shape.get(tuple(v.shape), [])), k


def test_path_in_another_layout_needs_its_config(cache, tmp_path):
    sd = random_checkpoint("detrex_dino_r50_4scale", seed=4)
    path = tmp_path / "dino_r50_4scale_12ep_49_2AP.pth"
    torch.save({"model": sd}, path)
    cfg = get_dino_cfg(os.path.join(REPO, "configs", "dino_r50_4scale.yaml"), ["MODEL.DEVICE", "cpu"])
    with pytest.raises(ValueError, match="PE_TEMPERATURE_H 10000.*PE_OFFSET -0.5.*DEC_PRED_CLASS_EMBED_SHARE False"):
        SafeCheckpointer(build_model(cfg)).load(str(path))


def test_mmdet_path_needs_its_box_prediction_floor(cache, tmp_path):
    """mmdetection's head floors the inverse sigmoid at 1e-5: a model built with per-layer heads but the
    official floor is refused with the option named."""
    path = tmp_path / "dino-4scale_r50_8xb2-12e_coco.pth"
    torch.save({"meta": {}, "state_dict": random_checkpoint("mmdet_dino_r50_4scale", seed=5)}, path)
    opts = ["MODEL.DEVICE", "cpu", "MODEL.DINO.DEC_PRED_CLASS_EMBED_SHARE", "False"]
    opts += ["MODEL.DINO.DEC_PRED_BBOX_EMBED_SHARE", "False"]
    cfg = get_dino_cfg(os.path.join(REPO, "configs", "dino_r50_4scale.yaml"), opts)
    with pytest.raises(ValueError, match=r"add the config options MODEL\.DINO\.BOX_PREDICTION_EPS 1e-05 "):
        SafeCheckpointer(build_model(cfg)).load(str(path))


class _OtherDetector(torch.nn.Module):
    """Not DINO, with names that are telltales of the DINO sources (``neck.``, ``bbox_head.``)."""

    def __init__(self):
        super().__init__()
        self.neck, self.bbox_head = torch.nn.Linear(2, 3), torch.nn.Linear(3, 4)


def test_other_models_load_their_own_names_unconverted(tmp_path):
    source, target = _OtherDetector(), _OtherDetector()
    path = tmp_path / "other.pth"
    torch.save({"model": source.state_dict()}, path)
    SafeCheckpointer(target).load(str(path))
    for k, v in target.state_dict().items():
        assert torch.equal(v, source.state_dict()[k]), k


# ----------------------------------------------------------------------------- a name through the tools


@pytest.fixture
def detrex_published(cache):
    return _publish(DETREX, cache)[0]


def test_name_through_default_predictor_and_demo(detrex_published, tmp_path):
    from detectron2.engine import DefaultPredictor

    cfg = model_zoo.get_config(DETREX, opts=SMALL_IMAGE)
    predictor = DefaultPredictor(cfg)
    expected = convert_state_dict(detrex_published, "detrex").state_dict
    assert torch.equal(predictor.model.state_dict()["class_embed.3.weight"], expected["class_embed.3.weight"])
    image = (np.random.default_rng(0).random((192, 256, 3)) * 255).astype(np.uint8)
    assert len(predictor(image)["instances"]) > 0

    sys.path.insert(0, os.path.join(REPO, "tools"))
    import demo

    Image.fromarray(image).save(tmp_path / "mine.jpg")
    written = demo.main(
        [
            "--config-file",
            "dino_detr://" + DETREX,
            "--input",
            str(tmp_path / "mine.jpg"),
            "--output",
            str(tmp_path / "vis"),
        ]
        + SMALL_IMAGE
    )
    assert len(written) == 1 and os.path.getsize(written[0]) > 0
    assert len(_Files.requests) == 1  # downloaded once for both


def test_name_through_train_net_and_benchmark_reads_the_config_not_the_weights(cache, tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import benchmark

    import train_net

    config = os.path.join(REPO, published_weights(DETREX).config)
    argv = ["--config-file", "dino_detr://" + DETREX, "--eval-only", "OUTPUT_DIR", str(tmp_path), "MODEL.DEVICE", "cpu"]
    args = train_net.argument_parser().parse_args(argv)
    cfg = train_net.setup(args)  # Detectron2's default_setup logs the config file's text
    assert cfg.MODEL.WEIGHTS == "dino_detr://" + DETREX and cfg.MODEL.DINO.PE_OFFSET == -0.5
    assert args.config_file == "dino_detr://" + DETREX
    cfg, path = benchmark.load_cfg("dino_detr://" + DETREX, "cpu", [])
    assert path == config and cfg.MODEL.DINO.PE_OFFSET == -0.5 and cfg.MODEL.WEIGHTS == ""
    assert _Files.requests == []  # the weights were not downloaded to read a config
    with pytest.raises(ValueError, match="binary file: open it with mode 'rb'"):
        PathManager.open("dino_detr://" + DETREX, "r")


def test_name_through_fine_tuning(detrex_published, tmp_path):
    from detectron2.utils.events import EventStorage

    from dino_detr.engine import DinoTrainer

    from train_utils import ci_cfg, ci_dataset

    ci_dataset(tmp_path / "data")
    cfg = ci_cfg(tmp_path / "out", 1)
    zoo = model_zoo.get_config(DETREX)
    cfg.MODEL.DINO.merge_from_other_cfg(zoo.MODEL.DINO)
    cfg.MODEL.RESNETS.merge_from_other_cfg(zoo.MODEL.RESNETS)
    cfg.MODEL.BACKBONE.merge_from_other_cfg(zoo.MODEL.BACKBONE)
    cfg.merge_from_list(["MODEL.WEIGHTS", zoo.MODEL.WEIGHTS, "MODEL.DINO.NUM_CLASSES", "4"])
    cfg.merge_from_list(["MODEL.DINO.DN_NUMBER", "10"])
    # one step at inputs with more than 900 encoder tokens; no evaluation
    cfg.merge_from_list(["SOLVER.IMS_PER_BATCH", "1", "INPUT.MIN_SIZE_TRAIN", "(256,)", "INPUT.MAX_SIZE_TRAIN", "320"])
    cfg.merge_from_list(["INPUT.DETR_CROP.ENABLED", "False", "SOLVER.STEPS", "()", "DATASETS.TEST", "()"])
    trainer = DinoTrainer(cfg)
    trainer.resume_or_load(resume=False)
    loaded = trainer.model.state_dict()
    expected = convert_state_dict(detrex_published, "detrex").state_dict
    assert torch.equal(
        loaded["transformer.encoder.layers.2.linear1.weight"], expected["transformer.encoder.layers.2.linear1.weight"]
    )
    assert loaded["class_embed.0.weight"].shape[0] == 4  # the fine-tuning rule: new class heads
    with EventStorage(0):
        trainer.train()
    assert trainer.iter == 1
