"""LazyConfig pieces of the DINO configs (``configs/*.py``): the model tree, data, optimizer,
schedule and ``train`` settings, in the shape of Detectron2's ``configs/common`` and detrex.

:func:`dino_model` builds the same ``@configurable`` classes as the YAML configs' ``DinoDetr.from_config``
(with the YAML defaults of ``MODEL.DINO``), in the same order, so that one seed gives the same model.
"""

from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling.backbone import BasicStem, ResNet
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import OmegaConf
from torch import nn
from torch.optim import AdamW

from dino_detr.compat import has_fast_coco_eval
from dino_detr.data import DinoDatasetMapper
from dino_detr.engine import dino_param_groups
from dino_detr.modeling import DinoDetr
from dino_detr.modeling.criterion import SetCriterion
from dino_detr.modeling.heads import make_box_head, make_class_head, per_layer_heads
from dino_detr.modeling.input_projection import InputProjection
from dino_detr.modeling.matcher import HungarianMatcher
from dino_detr.modeling.position_encoding import build_position_embedding
from dino_detr.modeling.transformer import DeformableTransformer

# torchvision-style ImageNet normalisation of RGB input (configs/Base-DINO.yaml).
PIXEL_MEAN = [123.675, 116.280, 103.530]
PIXEL_STD = [58.395, 57.120, 57.375]


def resnet(depth=50, out_features=("res3", "res4", "res5"), norm="FrozenBN", freeze_at=2):
    """Detectron2's ResNet as ``build_resnet_backbone`` builds it for Base-DINO.yaml (stride in the 3x3 conv)."""
    return L(ResNet)(
        stem=L(BasicStem)(in_channels=3, out_channels=64, norm=norm),
        # (stride_in_1x1 applies to the bottleneck blocks of R50 and deeper only)
        stages=L(ResNet.make_default_stages)(
            depth=depth, norm=norm, **({"stride_in_1x1": False} if depth >= 50 else {})
        ),
        out_features=list(out_features),
        freeze_at=freeze_at,
    )


def dino_model(
    backbone,
    in_features,
    in_channels,
    *,
    num_classes=80,
    num_feature_levels=4,
    hidden_dim=256,
    nheads=8,
    enc_layers=6,
    dec_layers=6,
    dim_feedforward=2048,
    num_queries=900,
    num_select=300,
    dn_number=100,
):
    """``DinoDetr`` on ``backbone``, whose maps ``in_features`` have ``in_channels`` channels.
    The keys follow the order in which ``DinoDetr.from_config`` creates the modules (class head,
    box head, encoder heads, transformer, projections, ...), which ``instantiate`` keeps."""
    return L(DinoDetr)(
        backbone=backbone,
        in_features=list(in_features),
        class_embed=L(per_layer_heads)(
            head=L(make_class_head)(hidden_dim=hidden_dim, num_classes=num_classes), num_layers=dec_layers, share=True
        ),
        transformer=L(DeformableTransformer)(
            dec_box_heads=L(per_layer_heads)(
                head=L(make_box_head)(hidden_dim=hidden_dim), num_layers=dec_layers, share=True
            ),
            enc_class_head=L(make_class_head)(hidden_dim=hidden_dim, num_classes=num_classes),
            enc_box_head=L(make_box_head)(hidden_dim=hidden_dim),
            d_model=hidden_dim,
            nhead=nheads,
            num_queries=num_queries,
            num_encoder_layers=enc_layers,
            num_decoder_layers=dec_layers,
            dim_feedforward=dim_feedforward,
            dropout=0.0,
            num_feature_levels=num_feature_levels,
            enc_n_points=4,
            dec_n_points=4,
            encoder_cpu_chunk_size=2048,
        ),
        input_proj=L(InputProjection)(
            in_channels=list(in_channels), hidden_dim=hidden_dim, num_levels=num_feature_levels
        ),
        position_embedding=L(build_position_embedding)(
            kind="sine", hidden_dim=hidden_dim, temperature_h=20, temperature_w=20, offset=0.0
        ),
        label_enc=L(nn.Embedding)(num_embeddings=num_classes + 1, embedding_dim=hidden_dim),
        criterion=L(SetCriterion)(
            num_classes=num_classes,
            matcher=L(HungarianMatcher)(
                cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0
            ),
            weight_dict={"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
            focal_alpha=0.25,
            focal_gamma=2.0,
        ),
        num_classes=num_classes,
        num_select=num_select,
        dn_number=dn_number,
        dn_label_noise_ratio=0.5,
        dn_box_noise_scale=0.4,
        aux_loss=True,
        enc_loss=True,
        pixel_mean=PIXEL_MEAN,
        pixel_std=PIXEL_STD,
    )


def dataloader_for(
    train_names,
    test_names,
    *,
    min_size_train=(480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
    max_size_train=1333,
    detr_crop=True,
    min_size_test=800,
    max_size_test=1333,
    total_batch_size=16,
    num_workers=4,
    aspect_ratio_grouping=True,
):
    """``dataloader.train`` / ``.test`` / ``.evaluator`` with DINO's augmentation
    (``build_dino_augmentations``: flip, multi-scale resize, and with probability 0.5 the DETR crop)."""
    flip = L(T.RandomFlip)(horizontal=True, vertical=False)
    multiscale = L(T.ResizeShortestEdge)(
        short_edge_length=list(min_size_train), max_size=max_size_train, sample_style="choice"
    )
    crop = [
        L(T.ResizeShortestEdge)(short_edge_length=[400, 500, 600], sample_style="choice"),
        L(T.RandomCrop)(crop_type="absolute_range", crop_size=[384, 600]),
    ]
    dataloader = OmegaConf.create()
    dataloader.train = L(build_detection_train_loader)(
        dataset=L(get_detection_dataset_dicts)(names=train_names, filter_empty=False),
        mapper=L(DinoDatasetMapper)(
            is_train=True,
            augmentations=[flip, multiscale],
            augmentations_with_crop=[flip, *crop, multiscale] if detr_crop else None,
            image_format="RGB",
        ),
        total_batch_size=total_batch_size,
        num_workers=num_workers,
        aspect_ratio_grouping=aspect_ratio_grouping,
    )
    dataloader.test = L(build_detection_test_loader)(
        dataset=L(get_detection_dataset_dicts)(names=test_names, filter_empty=False),
        mapper=L(DinoDatasetMapper)(
            is_train=False,
            augmentations=[L(T.ResizeShortestEdge)(short_edge_length=min_size_test, max_size=max_size_test)],
            image_format="RGB",
        ),
        num_workers=num_workers,
    )
    # Detectron2's fast (C++) COCO evaluation where its compiled ops are installed.
    dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names}", use_fast_impl=has_fast_coco_eval())
    return dataloader


def adamw(lr=1e-4, backbone_multiplier=0.1, weight_decay=1e-4):
    """AdamW over ``dino_param_groups`` (backbone at ``lr * backbone_multiplier``); the training
    tool sets ``params.model``."""
    return L(AdamW)(
        params=L(dino_param_groups)(
            model=None, base_lr="${..lr}", backbone_multiplier=backbone_multiplier, weight_decay="${..weight_decay}"
        ),
        lr=lr,
        weight_decay=weight_decay,
    )


def step_schedule(max_iter, steps, warmup_iters=0, warmup_factor=1.0, gamma=0.1):
    """The learning-rate multiplier of Detectron2's ``WarmupMultiStepLR`` (``build_lr_scheduler``)."""
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[gamma**k for k in range(len(steps) + 1)], milestones=list(steps), num_updates=max_iter
        ),
        warmup_factor=warmup_factor,
        warmup_length=min(warmup_iters / max_iter, 1.0),
    )


def train_settings(output_dir, max_iter, *, period, seed=-1):
    """``train``: Detectron2's ``configs/common/train.py`` keys, with detrex's ``clip_grad`` and
    ``model_ema``, and ``amp.precision`` (tools/lazyconfig_train_net.py)."""
    return OmegaConf.create(
        dict(
            output_dir=output_dir,
            init_checkpoint="",  # the weights MODEL.WEIGHTS takes (SafeCheckpointer)
            max_iter=max_iter,
            amp=dict(enabled=False, precision="float16"),
            clip_grad=dict(enabled=True, params=dict(max_norm=0.1, norm_type=2.0)),
            model_ema=dict(enabled=False, decay=0.9997),
            ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
            checkpointer=dict(period=period, max_to_keep=100),
            eval_period=period,
            log_period=20,
            device="cuda",
            seed=seed,
        )
    )
