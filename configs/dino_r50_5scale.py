# DINO-5scale R50, 12 epochs: configs/dino_r50_5scale.yaml as a LazyConfig (adds res2 as the finest level).
from .common.dino import dino_model, resnet
from .dino_r50_4scale import dataloader, lr_multiplier, optimizer, train  # noqa: F401  (sections kept)

features = ["res2", "res3", "res4", "res5"]
model = dino_model(resnet(50, features), features, in_channels=[256, 512, 1024, 2048], num_feature_levels=5)
train.output_dir = "./output/dino_r50_5scale"
