# DINO-4scale R50, 12 epochs: configs/dino_r50_4scale.yaml as a LazyConfig (tools/lazyconfig_train_net.py).
from .common.dino import adamw, dataloader_for, dino_model, resnet, step_schedule, train_settings

model = dino_model(resnet(50), in_features=["res3", "res4", "res5"], in_channels=[512, 1024, 2048])
dataloader = dataloader_for("coco_2017_train", "coco_2017_val")
optimizer = adamw()
# 12 epochs of COCO train2017 at batch 16; the learning rate drops 10x after epoch 11.
lr_multiplier = step_schedule(max_iter=88000, steps=[80600])
train = train_settings("./output/dino_r50_4scale", max_iter=88000, period=7330)
