"""A Detectron2 backbone wrapping any timm CNN created with ``features_only=True``."""

from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec

__all__ = ["TimmBackbone", "build_timm_backbone"]


class TimmBackbone(Backbone):
    """Feature maps ``timm_feat{i}`` of a timm model (one per entry of ``out_indices``).

    Args:
        model_name: a timm model name, e.g. ``"tf_mobilenetv3_small_075"``.
        out_indices: feature stages to return (timm's indices).
        pretrained: load timm's pretrained weights (needs network or a local cache);
            False gives a random initialisation.
        in_chans: input channels.
    """

    def __init__(self, model_name: str, out_indices=(1, 2, 3), pretrained: bool = False, in_chans: int = 3):
        super().__init__()
        import timm  # imported here so that `import dino_detr` stays light

        if model_name not in timm.list_models():
            raise ValueError(f"MODEL.TIMM.NAME: unknown timm model {model_name!r}")
        try:
            self.model = timm.create_model(
                model_name, pretrained=pretrained, features_only=True, out_indices=tuple(out_indices), in_chans=in_chans
            )
        except Exception as e:  # timm raises various errors when weights cannot be fetched
            raise RuntimeError(
                f"Could not create timm model {model_name!r} (pretrained={pretrained}); set "
                f"MODEL.TIMM.PRETRAINED False when offline or when no weights exist: {e}"
            ) from e
        info = self.model.feature_info
        self._out_features = [f"timm_feat{i}" for i in out_indices]
        self._out_feature_channels = dict(zip(self._out_features, info.channels()))
        self._out_feature_strides = dict(zip(self._out_features, info.reduction()))

    def forward(self, x):
        """(N, C, H, W) -> {name: (N, C_i, H / stride_i, W / stride_i)}"""
        return dict(zip(self._out_features, self.model(x)))

    def output_shape(self):
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_timm_backbone(cfg, input_shape: ShapeSpec):
    """Backbone ``"build_timm_backbone"`` configured by ``cfg.MODEL.TIMM``; pretrained weights
    are only requested when ``MODEL.TIMM.PRETRAINED`` is True."""
    return TimmBackbone(
        cfg.MODEL.TIMM.NAME,
        out_indices=cfg.MODEL.TIMM.OUT_INDICES,
        pretrained=cfg.MODEL.TIMM.PRETRAINED,
        in_chans=input_shape.channels,
    )
