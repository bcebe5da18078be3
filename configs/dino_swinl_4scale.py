# DINO-4scale Swin-L (384, ImageNet-22k), 12 epochs: configs/dino_swinl_4scale.yaml as a LazyConfig.
from detectron2.config import LazyCall as L

from dino_detr.modeling.swin import SwinTransformer

from .common.dino import dino_model
from .dino_r50_4scale import dataloader, lr_multiplier, optimizer, train  # noqa: F401  (sections kept)

features = ["swin1", "swin2", "swin3"]
swin_l = L(SwinTransformer)(
    embed_dim=192,
    depths=[2, 2, 18, 2],
    num_heads=[6, 12, 24, 48],
    window=12,
    out_features=features,
    patch_size=4,
    in_chans=3,
    mlp_ratio=4.0,
    drop_path_rate=0.2,
    freeze_at=0,
    use_checkpoint=True,
)
model = dino_model(swin_l, features, in_channels=[384, 768, 1536])
train.output_dir = "./output/dino_swinl_4scale"
