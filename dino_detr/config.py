"""Config keys of the DINO project, added to a Detectron2 ``CfgNode``.

Defaults are the official DINO-4scale R50 12-epoch settings (IDEA-Research/DINO,
``config/DINO/DINO_4scale.py``) expressed in Detectron2's vocabulary.
"""

import logging
import os

import torch
import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg


def add_dino_config(cfg):
    """Add every ``cfg.MODEL.DINO.*`` key and the DINO training keys to ``cfg`` (in place).

    Unknown keys in a YAML file or on the command line then fail in Detectron2's
    ``merge_from_file`` / ``merge_from_list`` with the key named; contradictory values fail
    in :func:`check_dino_config` when the model is built.
    """
    _add_model_config(cfg)
    _add_solver_config(cfg)
    _add_input_config(cfg)
    _add_dataset_config(cfg)


def get_dino_cfg(config_file, opts=()):
    """Detectron2's default config with the DINO keys, then ``config_file`` and the
    ``KEY VALUE`` overrides ``opts`` merged in (not frozen). ``config_file`` may also name
    published weights (``dino_detr://<source>/<name>``, see :mod:`dino_detr.model_zoo`).

    An empty or non-mapping config file, and a command-line option (``--resume``) caught
    among the overrides (argparse's ``REMAINDER`` takes everything after the first KEY),
    raise ``ValueError`` saying so.
    """
    flags = [o for o in opts if isinstance(o, str) and o.startswith("--")]
    if flags:
        raise ValueError(
            f"'{flags[0]}' is among the KEY VALUE config overrides {list(opts)}: everything after the first KEY is "
            f"read as overrides, so put command-line options such as {flags[0]} before them"
        )
    if config_file_path(config_file) != str(config_file):  # published weights: their config and MODEL.WEIGHTS
        from .model_zoo import get_config

        return get_config(str(config_file), opts=opts)
    _check_config_file(str(config_file))
    cfg = get_cfg()
    add_dino_config(cfg)
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    return cfg


def config_file_path(config_file) -> str:
    """The YAML file a ``--config-file`` value names: for published weights (``dino_detr://<name>``)
    this project's config file they fit (:func:`dino_detr.model_zoo.get_config_file`), otherwise
    ``config_file`` itself. For code that reads the file (Detectron2's ``default_setup`` logs it)."""
    if str(config_file).startswith("dino_detr://"):
        from .model_zoo import get_config_file

        return get_config_file(str(config_file))
    return str(config_file)


def resolve_device(device: str) -> str:
    """``device`` (a ``MODEL.DEVICE`` value), or ``"cpu"`` when it names CUDA and this machine has
    no usable GPU (with a warning): lets the tools run Detectron2's default ``"cuda"`` anywhere."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("MODEL.DEVICE=%s but CUDA is not available: running on the CPU", device)
        return "cpu"
    return device


def _check_config_file(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        content = yaml.safe_load(f)
    if not isinstance(content, dict):
        what = "is empty" if content is None else f"holds a {type(content).__name__}, not a mapping of config keys"
        raise ValueError(f"config file {path} {what}")


def check_dino_config(cfg):
    """Raise ``ValueError`` naming the key when DINO settings contradict each other."""
    d = cfg.MODEL.DINO
    positive = [
        "NUM_CLASSES",
        "HIDDEN_DIM",
        "NHEADS",
        "ENC_LAYERS",
        "DEC_LAYERS",
        "DIM_FEEDFORWARD",
        "ENC_N_POINTS",
        "DEC_N_POINTS",
        "NUM_QUERIES",
        "NUM_FEATURE_LEVELS",
        "NUM_SELECT",
    ]
    for key in positive:
        if d[key] <= 0:
            raise ValueError(f"MODEL.DINO.{key} must be positive, got {d[key]}")
    if d.ENCODER_CPU_CHUNK_SIZE < 0:
        raise ValueError(
            f"MODEL.DINO.ENCODER_CPU_CHUNK_SIZE must be >= 0 (0 = no slicing), got {d.ENCODER_CPU_CHUNK_SIZE}"
        )
    if d.HIDDEN_DIM % d.NHEADS != 0:
        raise ValueError(f"MODEL.DINO.HIDDEN_DIM={d.HIDDEN_DIM} must be divisible by MODEL.DINO.NHEADS={d.NHEADS}")
    if d.HIDDEN_DIM % 32 != 0:
        raise ValueError(f"MODEL.DINO.HIDDEN_DIM={d.HIDDEN_DIM} must be divisible by 32 (GroupNorm(32) projections)")
    if len(d.IN_FEATURES) == 0:
        raise ValueError("MODEL.DINO.IN_FEATURES is empty")
    if d.NUM_FEATURE_LEVELS < len(d.IN_FEATURES):
        raise ValueError(
            f"MODEL.DINO.NUM_FEATURE_LEVELS={d.NUM_FEATURE_LEVELS} is smaller than the "
            f"{len(d.IN_FEATURES)} MODEL.DINO.IN_FEATURES {list(d.IN_FEATURES)}"
        )
    if d.NUM_SELECT > d.NUM_QUERIES * d.NUM_CLASSES:
        raise ValueError(
            f"MODEL.DINO.NUM_SELECT={d.NUM_SELECT} exceeds NUM_QUERIES * NUM_CLASSES = {d.NUM_QUERIES * d.NUM_CLASSES}"
        )
    if d.COST_CLASS == 0 and d.COST_BBOX == 0 and d.COST_GIOU == 0:
        raise ValueError("MODEL.DINO.COST_CLASS, COST_BBOX and COST_GIOU are all 0: the matcher has no cost")
    if d.DN_LABELBOOK_SIZE and d.DN_LABELBOOK_SIZE < d.NUM_CLASSES:
        raise ValueError(
            f"MODEL.DINO.DN_LABELBOOK_SIZE={d.DN_LABELBOOK_SIZE} is smaller than MODEL.DINO.NUM_CLASSES={d.NUM_CLASSES}"
        )
    if not 0.0 <= d.DN_LABEL_NOISE_RATIO <= 1.0:
        raise ValueError(f"MODEL.DINO.DN_LABEL_NOISE_RATIO must be in [0, 1], got {d.DN_LABEL_NOISE_RATIO}")
    if not 0 < d.BOX_PREDICTION_EPS < 0.5:
        raise ValueError(f"MODEL.DINO.BOX_PREDICTION_EPS must be in (0, 0.5), got {d.BOX_PREDICTION_EPS}")
    if d.DN_BOX_NOISE_SCALE < 0 or d.DN_NUMBER < 0:
        raise ValueError("MODEL.DINO.DN_BOX_NOISE_SCALE and MODEL.DINO.DN_NUMBER must be >= 0")
    if d.COMPILE and d.COMPILE not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(
            f"MODEL.DINO.COMPILE={d.COMPILE!r} is not a torch.compile backend (e.g. 'inductor'; '' = eager)"
        )
    if d.INFERENCE_DTYPE not in ("float32", "bfloat16", "float16", "auto"):
        raise ValueError(
            f"MODEL.DINO.INFERENCE_DTYPE must be float32, bfloat16, float16 or auto, got {d.INFERENCE_DTYPE!r}"
        )
    if d.POSITION_EMBEDDING not in ("sine", "learned"):
        raise ValueError(f"MODEL.DINO.POSITION_EMBEDDING must be 'sine' or 'learned', got {d.POSITION_EMBEDDING!r}")
    if cfg.MODEL.BACKBONE.NAME == "build_swin_backbone":
        _check_swin_config(cfg)


def _check_swin_config(cfg):
    """The ``MODEL.SWIN`` keys of a ``build_swin_backbone`` config."""
    s = cfg.MODEL.SWIN
    if len(s.DEPTHS) != len(s.NUM_HEADS):
        raise ValueError(
            f"MODEL.SWIN.DEPTHS {list(s.DEPTHS)} and MODEL.SWIN.NUM_HEADS {list(s.NUM_HEADS)} "
            "must have one entry per stage"
        )
    widths = [s.EMBED_DIM * 2**i for i in range(len(s.DEPTHS))]
    bad = [(w, h) for w, h in zip(widths, s.NUM_HEADS) if w % h]
    if bad:
        raise ValueError(
            f"MODEL.SWIN: stage widths {widths} (EMBED_DIM * 2**i) must be divisible by their "
            f"NUM_HEADS {list(s.NUM_HEADS)}; {bad[0][0]} is not divisible by {bad[0][1]}"
        )
    names = [f"swin{i}" for i in range(len(s.DEPTHS))]
    if not s.OUT_FEATURES or any(f not in names for f in s.OUT_FEATURES):
        raise ValueError(f"MODEL.SWIN.OUT_FEATURES {list(s.OUT_FEATURES)}: expected a non-empty subset of {names}")
    if not 0 <= cfg.MODEL.BACKBONE.FREEZE_AT <= len(s.DEPTHS) + 1:
        raise ValueError(
            f"MODEL.BACKBONE.FREEZE_AT={cfg.MODEL.BACKBONE.FREEZE_AT} for Swin must be in [0, {len(s.DEPTHS) + 1}]"
        )


def _add_model_config(cfg):
    cfg.MODEL.DINO = CN()
    d = cfg.MODEL.DINO
    d.NUM_CLASSES = 80
    # Backbone features fed to the transformer (strides 8, 16, 32); extra levels beyond
    # len(IN_FEATURES) are stride-2 3x3 convolutions on the last feature.
    d.IN_FEATURES = ["res3", "res4", "res5"]
    d.NUM_FEATURE_LEVELS = 4
    # Transformer
    d.HIDDEN_DIM = 256
    d.NHEADS = 8
    d.ENC_LAYERS = 6
    d.DEC_LAYERS = 6
    d.DIM_FEEDFORWARD = 2048
    d.DROPOUT = 0.0
    d.ENC_N_POINTS = 4
    d.DEC_N_POINTS = 4
    d.NUM_QUERIES = 900
    # Position embedding: "sine" (DINO's SineHW, separate temperatures) or "learned".
    d.POSITION_EMBEDDING = "sine"
    d.PE_TEMPERATURE_H = 20
    d.PE_TEMPERATURE_W = 20
    # Added to the pixel index of the sine embedding: 0 (official DINO), -0.5 (detrex).
    d.PE_OFFSET = 0.0
    # Contrastive denoising. DN_NUMBER is the query budget: max(DN_NUMBER // M, 1) groups, M the
    # largest box count of an image in the batch (as detrex). The official DINO does the same only
    # for DN_NUMBER >= 50; below it uses 2 * DN_NUMBER groups whatever M is, so configs with small
    # DN_NUMBER give fewer groups here than there.
    d.DN_NUMBER = 100
    d.DN_LABEL_NOISE_RATIO = 0.5
    d.DN_BOX_NOISE_SCALE = 0.4  # official DINO config; the paper and detrex use 1.0
    # Size of the label embedding used for denoising queries; 0 means NUM_CLASSES.
    d.DN_LABELBOOK_SIZE = 0
    # Heads
    d.DEC_PRED_CLASS_EMBED_SHARE = True
    d.DEC_PRED_BBOX_EMBED_SHARE = True
    # Floor of the inverse sigmoid of the previous box when a decoder layer's box head refines it
    # into the layer's predicted box (look forward twice): 1e-3 (official DINO, detrex); mmdetection's
    # head uses 1e-5 (its decoder's own refinement keeps 1e-3). Matters only for box coordinates
    # within the floor of 0 or 1.
    d.BOX_PREDICTION_EPS = 1e-3
    # Losses and matcher
    d.FOCAL_ALPHA = 0.25
    d.FOCAL_GAMMA = 2.0
    d.COST_CLASS = 2.0
    d.COST_BBOX = 5.0
    d.COST_GIOU = 2.0
    d.CLASS_LOSS_COEF = 1.0
    d.BBOX_LOSS_COEF = 5.0
    d.GIOU_LOSS_COEF = 2.0
    d.AUX_LOSS = True
    d.ENC_LOSS = True
    # Inference
    d.NUM_SELECT = 300
    # CPU inference runs each encoder layer's FFN on slices of this many tokens: same result,
    # without the full (tokens, DIM_FEEDFORWARD) activation (165 MB per image at 800x1216).
    # 0 = no slicing. Training and GPU inference never slice.
    d.ENCODER_CPU_CHUNK_SIZE = 2048
    # Inference through torch.compile with this backend ("inductor"; "" = eager): the network
    # from the padded images to the predictions is one graph, dynamic in the batch and image
    # sizes (no recompilation per size). The first call compiles (about a minute on a CPU).
    d.COMPILE = ""
    # Inference precision: float32 | bfloat16 | float16 | auto (bfloat16 where the CPU or GPU computes it
    # natively, else float32). Not float32: the model is converted once, at its first inference call
    # (DinoDetr.prepare_for_inference: folded batch norms, weights cast, class/box heads in float32).
    d.INFERENCE_DTYPE = "float32"
    # Backbone "build_timm_backbone": any timm CNN with features_only=True; set
    # MODEL.DINO.IN_FEATURES to the matching ["timm_feat{i}"] names.
    cfg.MODEL.TIMM = CN()
    cfg.MODEL.TIMM.NAME = "resnet50"
    cfg.MODEL.TIMM.OUT_INDICES = [2, 3, 4]
    cfg.MODEL.TIMM.PRETRAINED = False
    # Backbone "build_swin_backbone" (dino_detr/modeling/swin.py); defaults: Swin-T. Features
    # "swin{i}" = stage i (stride 4 * 2**i); MODEL.BACKBONE.FREEZE_AT 1 freezes the patch
    # embedding, k >= 2 also stages 0..k-2.
    cfg.MODEL.SWIN = CN()
    cfg.MODEL.SWIN.PATCH_SIZE = 4
    cfg.MODEL.SWIN.EMBED_DIM = 96
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    cfg.MODEL.SWIN.MLP_RATIO = 4.0
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.2  # stochastic depth of the last block (linear from 0)
    cfg.MODEL.SWIN.OUT_FEATURES = ["swin1", "swin2", "swin3"]
    # Recompute each block's activations in the backward pass (less training memory, ~30% slower).
    cfg.MODEL.SWIN.USE_CHECKPOINT = False


def _add_solver_config(cfg):
    s = cfg.SOLVER
    s.OPTIMIZER = "ADAMW"
    s.BACKBONE_MULTIPLIER = 0.1
    s.AMP.ENABLED = False
    # Autocast dtype of AMP training: "float16" (with a grad scaler) or "bfloat16" (float32's
    # range, no scaler; Ampere and newer GPUs, and CPUs).
    s.AMP.PRECISION = "float16"
    cfg.MODEL_EMA = CN()
    cfg.MODEL_EMA.ENABLED = False
    cfg.MODEL_EMA.DECAY = 0.9997


def _add_input_config(cfg):
    # DETR-style augmentation: with probability 0.5, resize to one of CROP_RESIZE and
    # random-crop to CROP.SIZE (absolute_range) before the multi-scale resize.
    cfg.INPUT.DETR_CROP = CN()
    cfg.INPUT.DETR_CROP.ENABLED = True
    cfg.INPUT.DETR_CROP.RESIZE = [400, 500, 600]
    cfg.INPUT.DETR_CROP.SIZE = [384, 600]


def _add_dataset_config(cfg):
    # COCO-format datasets to register by name before training / evaluation / the demo:
    # [[name, annotation JSON, image folder], ...] (tools: --dataset NAME=JSON:FOLDER). Each is
    # checked once (images and annotations) before use; see dino_detr/data/coco.py.
    cfg.DATASETS.COCO = []
