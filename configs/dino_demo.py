# The demo model (configs/dino_demo.yaml) as a LazyConfig: a small DINO on the embedded demo
# dataset (R18 up to res4 with GroupNorm, 3 levels, width 128), trained from random initialisation.
from .common.dino import adamw, dataloader_for, dino_model, resnet, step_schedule, train_settings

model = dino_model(
    resnet(18, out_features=("res3", "res4"), norm="GN", freeze_at=0),
    in_features=["res3", "res4"],
    in_channels=[128, 256],
    num_classes=4,
    num_feature_levels=3,
    hidden_dim=128,
    nheads=4,
    enc_layers=2,
    dec_layers=3,
    dim_feedforward=512,
    num_queries=100,
    num_select=100,
    dn_number=20,
)
dataloader = dataloader_for(
    "dino_demo_train",
    "dino_demo_val",
    min_size_train=(192, 208, 224, 240),
    max_size_train=320,
    detr_crop=False,
    min_size_test=224,
    max_size_test=320,
    total_batch_size=2,
    num_workers=0,
    aspect_ratio_grouping=False,
)
optimizer = adamw(lr=4e-4, backbone_multiplier=1.0)
lr_multiplier = step_schedule(max_iter=3200, steps=[2750], warmup_iters=100, warmup_factor=0.01)
train = train_settings("output/dino_demo", max_iter=3200, period=1600, seed=0)
train.eval_period = 0
