"""Config keys of the DINO project, added to a Detectron2 ``CfgNode``.

Defaults are the official DINO-4scale R50 12-epoch settings (IDEA-Research/DINO,
``config/DINO/DINO_4scale.py``) expressed in Detectron2's vocabulary.
"""
from detectron2.config import CfgNode as CN


def add_dino_config(cfg):
    """Add every ``cfg.MODEL.DINO.*`` key and the DINO training keys to ``cfg`` (in place)."""
    _add_model_config(cfg)
    _add_solver_config(cfg)
    _add_input_config(cfg)


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
    # Contrastive denoising
    d.DN_NUMBER = 100
    d.DN_LABEL_NOISE_RATIO = 0.5
    d.DN_BOX_NOISE_SCALE = 0.4  # official DINO config; the paper and detrex use 1.0
    # Size of the label embedding used for denoising queries; 0 means NUM_CLASSES.
    d.DN_LABELBOOK_SIZE = 0
    # Heads
    d.DEC_PRED_CLASS_EMBED_SHARE = True
    d.DEC_PRED_BBOX_EMBED_SHARE = True
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


def _add_solver_config(cfg):
    s = cfg.SOLVER
    s.OPTIMIZER = "ADAMW"
    s.BACKBONE_MULTIPLIER = 0.1
    s.AMP.ENABLED = False
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
