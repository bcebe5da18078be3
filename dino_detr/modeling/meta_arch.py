"""DINO as a Detectron2 meta-architecture (``MODEL.META_ARCHITECTURE: "DinoDetr"``)."""

import functools
import logging
import threading
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn
from torchvision.ops import box_convert

from dino_detr.config import check_dino_config

from .criterion import SetCriterion
from .decoder import look_forward_twice
from .denoising import DenoisingQueries, contrastive_denoising, dn_positive_indices
from .heads import make_box_head, make_class_head, per_layer_heads
from .inference_precision import cast_inputs_on_entry, cast_module, fold_batch_norms, resolve_inference_dtype
from .input_checks import check_images, check_training_targets
from .input_projection import InputProjection
from .matcher import HungarianMatcher
from .position_encoding import build_position_embedding
from .transformer import DeformableTransformer

__all__ = ["DinoDetr", "image_padding_mask", "top_detections"]

logger = logging.getLogger(__name__)

# One conversion at a time (prepare_for_inference changes the model in place; threads may share a predictor).
_PREPARE_LOCK = threading.Lock()


def image_padding_mask(image_sizes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 2) valid (h, w) per image of a batch padded to ``height`` x ``width`` -> (N, H, W)
    bool, True at the padded pixels (tensor ops only, so it traces with dynamic sizes)."""
    rows = torch.arange(height, device=image_sizes.device)[None, :, None] >= image_sizes[:, 0, None, None]
    cols = torch.arange(width, device=image_sizes.device)[None, None, :] >= image_sizes[:, 1, None, None]
    return rows | cols


def _sizes_tensor(image_sizes, device) -> torch.Tensor:
    """(N, 2) int64 of an ImageList's ``image_sizes`` (ints, or 0-dim tensors under ``torch.jit.trace``)."""
    sizes = [torch.stack([torch.as_tensor(s, dtype=torch.long) for s in hw]) for hw in image_sizes]
    return torch.stack(sizes).to(device)


def top_detections(logits: torch.Tensor, boxes: torch.Tensor, image_sizes: torch.Tensor, num_select: int):
    """Top ``num_select`` (query, class) pairs of each image by sigmoid score.

    Args:
        logits: (N, K, classes); boxes: (N, K, 4) normalized cxcywh; image_sizes: (N, 2) valid (h, w).
    Returns:
        boxes (N, num_select, 4) xyxy in the pixels of the valid image, scores (N, num_select)
        in decreasing order, classes (N, num_select) int64.
    """
    num_classes = logits.shape[-1]
    scores, index = logits.sigmoid().flatten(1).topk(num_select, dim=1)
    boxes = torch.gather(
        box_convert(boxes, "cxcywh", "xyxy"),
        1,
        torch.div(index, num_classes, rounding_mode="floor")[..., None].expand(-1, -1, 4),
    )
    scale = image_sizes.flip(-1).repeat(1, 2).to(boxes.dtype)[:, None]  # (N, 1, 4): w, h, w, h
    return boxes * scale, scores, index % num_classes


@META_ARCH_REGISTRY.register()
class DinoDetr(nn.Module):
    """DINO: backbone -> input projections -> deformable encoder -> mixed query selection ->
    deformable decoder (with contrastive denoising queries in training) -> class/box heads.

    Parameter names mirror the official implementation (``input_proj``, ``transformer``,
    ``class_embed``, ``bbox_embed``, ``label_enc``) so official checkpoints convert by
    renaming; the backbone is Detectron2's (``backbone.*``).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        in_features: List[str],
        transformer: DeformableTransformer,
        input_proj: InputProjection,
        position_embedding: nn.Module,
        class_embed: nn.ModuleList,
        label_enc: nn.Embedding,
        criterion: SetCriterion,
        num_classes: int,
        num_select: int,
        dn_number: int,
        dn_label_noise_ratio: float,
        dn_box_noise_scale: float,
        aux_loss: bool,
        enc_loss: bool,
        pixel_mean: List[float],
        pixel_std: List[float],
        compile_backend: str = "",
        inference_dtype: str = "float32",
        box_prediction_eps: float = 1e-3,
    ):
        """
        Args:
            backbone: Detectron2 backbone whose ``in_features`` maps feed the transformer.
            transformer: encoder, query selection and decoder; its decoder shares ``bbox_embed``.
            input_proj: projections of the backbone maps (+ extra levels) to the hidden size.
            position_embedding: mask (N, H, W) -> (N, C, H, W).
            class_embed: one class head per decoder layer (a shared module by default); the box
                heads are the decoder's (``bbox_embed``, the same modules as
                ``transformer.decoder.bbox_embed``, which refine its boxes).
            label_enc: embedding of the denoising labels (label book + 1 rows, as official).
            criterion: the DINO losses; num_select: detections kept per image.
            dn_*: contrastive denoising settings (``dn_number`` 0 disables it).
            pixel_mean / pixel_std: input normalization, in the channel order of the input.
            compile_backend: when set, inference runs :meth:`predict_padded` through
                ``torch.compile(backend=compile_backend, dynamic=True)``; training stays eager.
            inference_dtype: ``MODEL.DINO.INFERENCE_DTYPE``; anything but "float32" converts the model
                once, at its first inference call (:meth:`prepare_for_inference`).
            box_prediction_eps: floor of the inverse sigmoid of the previous box in each layer's
                box prediction (``MODEL.DINO.BOX_PREDICTION_EPS``; mmdetection's head: 1e-5).
        """
        super().__init__()
        self.backbone = backbone
        self.in_features = in_features
        self.input_proj = input_proj
        self.position_embedding = position_embedding
        self.transformer = transformer
        self.class_embed = class_embed
        self.bbox_embed = transformer.decoder.bbox_embed
        self.label_enc = label_enc
        self.criterion = criterion
        self.num_classes = num_classes
        self.num_select = num_select
        self.dn_number = dn_number
        self.dn_label_noise_ratio = dn_label_noise_ratio
        self.dn_box_noise_scale = dn_box_noise_scale
        self.aux_loss = aux_loss
        self.enc_loss = enc_loss
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.compile_backend = compile_backend
        self.inference_dtype = inference_dtype
        self.box_prediction_eps = box_prediction_eps
        self.prepared_dtype: Optional[torch.dtype] = None  # set by prepare_for_inference
        self._has_trained = False

    @classmethod
    def from_config(cls, cfg):
        check_dino_config(cfg)
        d = cfg.MODEL.DINO
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in d.IN_FEATURES if f not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.DINO.IN_FEATURES {missing} are not produced by the backbone (it gives {sorted(shapes)}); "
                "set the backbone's OUT_FEATURES (e.g. MODEL.RESNETS.OUT_FEATURES) accordingly"
            )
        class_head = make_class_head(d.HIDDEN_DIM, d.NUM_CLASSES)
        box_head = make_box_head(d.HIDDEN_DIM)
        class_embed = per_layer_heads(class_head, d.DEC_LAYERS, d.DEC_PRED_CLASS_EMBED_SHARE)
        bbox_embed = per_layer_heads(box_head, d.DEC_LAYERS, d.DEC_PRED_BBOX_EMBED_SHARE)
        transformer = DeformableTransformer(
            enc_class_head=make_class_head(d.HIDDEN_DIM, d.NUM_CLASSES),
            enc_box_head=make_box_head(d.HIDDEN_DIM),
            dec_box_heads=bbox_embed,
            d_model=d.HIDDEN_DIM,
            nhead=d.NHEADS,
            num_queries=d.NUM_QUERIES,
            num_encoder_layers=d.ENC_LAYERS,
            num_decoder_layers=d.DEC_LAYERS,
            dim_feedforward=d.DIM_FEEDFORWARD,
            dropout=d.DROPOUT,
            num_feature_levels=d.NUM_FEATURE_LEVELS,
            enc_n_points=d.ENC_N_POINTS,
            dec_n_points=d.DEC_N_POINTS,
            encoder_cpu_chunk_size=d.ENCODER_CPU_CHUNK_SIZE,
        )
        matcher = HungarianMatcher(d.COST_CLASS, d.COST_BBOX, d.COST_GIOU, d.FOCAL_ALPHA, d.FOCAL_GAMMA)
        weights = {"loss_class": d.CLASS_LOSS_COEF, "loss_bbox": d.BBOX_LOSS_COEF, "loss_giou": d.GIOU_LOSS_COEF}
        return {
            "backbone": backbone,
            "in_features": list(d.IN_FEATURES),
            "transformer": transformer,
            "input_proj": InputProjection(
                [shapes[f].channels for f in d.IN_FEATURES], d.HIDDEN_DIM, d.NUM_FEATURE_LEVELS
            ),
            "position_embedding": build_position_embedding(
                d.POSITION_EMBEDDING, d.HIDDEN_DIM, d.PE_TEMPERATURE_H, d.PE_TEMPERATURE_W, d.PE_OFFSET
            ),
            "class_embed": class_embed,
            "label_enc": nn.Embedding((d.DN_LABELBOOK_SIZE or d.NUM_CLASSES) + 1, d.HIDDEN_DIM),
            "criterion": SetCriterion(d.NUM_CLASSES, matcher, weights, d.FOCAL_ALPHA, d.FOCAL_GAMMA),
            "num_classes": d.NUM_CLASSES,
            "num_select": d.NUM_SELECT,
            "dn_number": d.DN_NUMBER,
            "dn_label_noise_ratio": d.DN_LABEL_NOISE_RATIO,
            "dn_box_noise_scale": d.DN_BOX_NOISE_SCALE,
            "aux_loss": d.AUX_LOSS,
            "enc_loss": d.ENC_LOSS,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "compile_backend": d.COMPILE,
            "inference_dtype": d.INFERENCE_DTYPE,
            "box_prediction_eps": d.BOX_PREDICTION_EPS,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Check, normalize the (C, H, W) images and pad them to the largest one (padding = 0)."""
        check_images(batched_inputs, len(self.pixel_mean))
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images)

    @staticmethod
    def padding_mask(images: ImageList) -> torch.Tensor:
        """(N, H, W) bool, True at the padded pixels of the batch."""
        sizes = _sizes_tensor(images.image_sizes, images.tensor.device)
        return image_padding_mask(sizes, *images.tensor.shape[-2:])

    def prepare_targets(self, gt_instances: List[Instances]) -> List[Dict[str, torch.Tensor]]:
        """Per image ``labels`` (M,) and ``boxes`` (M, 4) cxcywh normalized by the image size."""
        targets = []
        for inst in gt_instances:
            h, w = inst.image_size
            scale = torch.as_tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = inst.gt_boxes.tensor.to(self.device) / scale
            targets.append({"labels": inst.gt_classes.to(self.device), "boxes": box_convert(boxes, "xyxy", "cxcywh")})
        return targets

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: Detectron2 format: per image ``image`` (C, H, W) in the model's input
                format, ``instances`` (training), optional ``height`` / ``width`` of the output.
        Returns:
            training: dict of weighted losses; eval: per image ``{"instances": Instances}`` with
            ``pred_boxes``, ``scores``, ``pred_classes`` in the output resolution.
        """
        if self.training:
            if self.prepared_dtype is not None:
                raise RuntimeError(
                    f"DinoDetr: this model was converted for {self.prepared_dtype} inference (prepare_for_inference: "
                    "folded batch norms, cast weights) and cannot be trained; build and load a new model to train"
                )
            self._has_trained = True
        elif self.inference_dtype != "float32" and self.prepared_dtype is None:
            if self._has_trained:  # evaluation during training keeps the trained weights as they are
                self.inference_dtype = "float32"
                logger.info("DinoDetr: MODEL.DINO.INFERENCE_DTYPE is not applied to a model being trained")
            else:
                with _PREPARE_LOCK:  # a second thread finds the model prepared (same dtype: a no-op)
                    self.prepare_for_inference(self.inference_dtype)
        images = self.preprocess_image(batched_inputs)
        targets = None
        dn = None
        if self.training:
            if any("instances" not in x for x in batched_inputs):
                raise ValueError("DinoDetr: training inputs need 'instances' (ground truth) for every image")
            check_training_targets(batched_inputs, self.num_classes)
            targets = self.prepare_targets([x["instances"] for x in batched_inputs])
            dn = self.contrastive_denoising(targets)
        outputs = self.predict(images, dn)
        if self.training:
            return self.losses(outputs, targets, dn)
        return self.inference(outputs, images.image_sizes, batched_inputs)

    @torch.no_grad()
    def prepare_for_inference(self, dtype="auto", channels_last: bool = True) -> "DinoDetr":
        """Converts this model, once and in place, for inference in ``dtype`` (a torch dtype or a
        ``MODEL.DINO.INFERENCE_DTYPE`` name; "auto": bfloat16 where the device computes it natively).

        ``forward`` calls it at the first inference call when ``MODEL.DINO.INFERENCE_DTYPE`` is not
        "float32", i.e. after the checkpoint is loaded (``DefaultPredictor``, ``--eval-only``); call it
        yourself for :class:`dino_detr.export.DetectorForExport`. Steps: the backbone's (frozen or eval-mode) batch
        norms folded into its convolutions; every weight cast to ``dtype`` except the float32 islands, the class
        and box heads (so box refinement, inverse sigmoid and top-k scores are float32; proposals,
        reference points and sampling locations are computed in float32 by the modules); the backbone's
        input cast to ``dtype`` in channels-last memory (``channels_last``).

        The converted model refuses training forwards and ``load_state_dict`` (its parameters are no
        longer the checkpoint's). Returns ``self``.
        """
        if isinstance(dtype, str):
            dtype = resolve_inference_dtype(dtype, self.device)
        if self.prepared_dtype is not None:
            if self.prepared_dtype != dtype:
                raise RuntimeError(f"DinoDetr: already prepared for {self.prepared_dtype} inference, not {dtype}")
            return self
        self.eval()
        folded = fold_batch_norms(self.backbone)
        heads = {
            id(m): m
            for m in (
                *self.class_embed,
                *self.bbox_embed,
                self.transformer.enc_out_class_embed,
                self.transformer.enc_out_bbox_embed,
            )
        }.values()
        for part in (self.backbone, self.input_proj, self.position_embedding, self.transformer, self.label_enc):
            cast_module(part, dtype, keep=heads)
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        cast_inputs_on_entry(self.backbone, dtype, channels_last)
        cast_inputs_on_entry(self.transformer.decoder.ref_point_head, dtype)
        for head in heads:
            cast_inputs_on_entry(head, torch.float32)
        self.register_load_state_dict_pre_hook(_refuse_loading_prepared_model)
        self.prepared_dtype = dtype
        logger.info(
            f"DinoDetr: prepared for {str(dtype).removeprefix('torch.')} inference ({folded} batch norms folded, "
            f"class and box heads in float32{', channels-last backbone' if channels_last else ''})"
        )
        return self

    def contrastive_denoising(self, targets) -> Optional[DenoisingQueries]:
        """Denoising queries of this batch (None when disabled or when it has no box)."""
        return contrastive_denoising(
            [t["labels"] for t in targets],
            [t["boxes"] for t in targets],
            self.label_enc,
            num_queries=self.transformer.num_queries,
            dn_number=self.dn_number,
            label_noise_ratio=self.dn_label_noise_ratio,
            box_noise_scale=self.dn_box_noise_scale,
            num_classes=self.num_classes,
        )

    def predict(self, images: ImageList, dn: Optional[DenoisingQueries] = None) -> Dict[str, object]:
        """Runs the network on a batch (see :meth:`predict_padded`), compiled in inference when
        ``MODEL.DINO.COMPILE`` names a backend."""
        if self.compile_backend and not self.training and dn is None:
            return _compiled_predict(self.compile_backend)(self, images.tensor, self.padding_mask(images))
        return self.predict_padded(images.tensor, self.padding_mask(images), dn)

    def predict_padded(
        self, images: torch.Tensor, mask: torch.Tensor, dn: Optional[DenoisingQueries] = None
    ) -> Dict[str, object]:
        """Runs the network on normalized, padded images.

        Args:
            images: (N, C, H, W) normalized batch; mask: (N, H, W) bool, True at padding.
        Returns:
            ``layers``: per decoder layer ``{pred_logits (N, K, classes), pred_boxes (N, K, 4)}``
            for the K matching queries (last layer last); ``enc``: the selected encoder
            proposals' predictions; ``dn_layers``: per layer predictions of the P denoising
            queries (empty without denoising). Boxes are normalized cxcywh.
        """
        features = self.backbone(images)
        srcs, masks = self.input_proj([features[f] for f in self.in_features], mask)
        pos = [self.position_embedding(m).to(s.dtype) for s, m in zip(srcs, masks)]
        if dn is None:
            out = self.transformer(srcs, masks, pos)
        else:
            out = self.transformer(srcs, masks, pos, dn.tgt, dn.anchors_unsig, dn.attn_mask)
        pad = 0 if dn is None else dn.pad_size
        layers, dn_layers = [], []
        for class_head, box_head, hidden, reference in zip(
            self.class_embed, self.bbox_embed, out["hidden"], out["boxes"][:-1]
        ):
            logits = class_head(hidden)
            boxes = look_forward_twice(box_head, hidden, reference, self.box_prediction_eps)
            layers.append({"pred_logits": logits[:, pad:], "pred_boxes": boxes[:, pad:]})
            dn_layers.append({"pred_logits": logits[:, :pad], "pred_boxes": boxes[:, :pad]})
        return {
            "layers": layers,
            "enc": {"pred_logits": out["enc_logits"], "pred_boxes": out["enc_boxes"]},
            "dn_layers": dn_layers if pad else [],
        }

    def losses(self, outputs, targets, dn: Optional[DenoisingQueries]) -> Dict[str, torch.Tensor]:
        """Matching losses (last layer, auxiliary layers, encoder) plus denoising losses."""
        layers = outputs["layers"] if self.aux_loss else outputs["layers"][-1:]
        if dn is None:
            losses = self.criterion(layers, targets, enc_outputs=outputs["enc"] if self.enc_loss else None)
            # Same keys in every iteration and on every worker; keeps `label_enc` in the graph (DDP).
            zero = self.label_enc.weight.sum() * 0.0
            losses.update(self.criterion.dn_placeholder(len(layers), zero))
            return losses
        dn_layers = outputs["dn_layers"] if self.aux_loss else outputs["dn_layers"][-1:]
        return self.criterion(
            layers,
            targets,
            enc_outputs=outputs["enc"] if self.enc_loss else None,
            dn_outputs=dn_layers,
            dn_indices=dn_positive_indices([len(t["labels"]) for t in targets], dn),
            dn_num_groups=dn.num_groups,
        )

    def inference(self, outputs, image_sizes, batched_inputs) -> List[Dict[str, Instances]]:
        """Top ``num_select`` (query, class) pairs by sigmoid score, boxes in the output size."""
        last = outputs["layers"][-1]
        sizes = _sizes_tensor(image_sizes, last["pred_boxes"].device)
        boxes, scores, classes = top_detections(last["pred_logits"], last["pred_boxes"], sizes, self.num_select)
        results = []
        for i, (h, w) in enumerate(image_sizes):
            inst = Instances((h, w))
            inst.pred_boxes = Boxes(boxes[i])
            inst.scores = scores[i]
            inst.pred_classes = classes[i]
            out_h = batched_inputs[i].get("height", h)
            out_w = batched_inputs[i].get("width", w)
            results.append({"instances": detector_postprocess(inst, out_h, out_w)})
        return results


def _refuse_loading_prepared_model(module, *args, **kwargs):
    raise RuntimeError(
        f"DinoDetr: cannot load weights into a model converted for {module.prepared_dtype} inference (its batch "
        "norms are folded into the convolutions); load them into a new model, which converts at its first "
        "inference call"
    )


@functools.cache
def _compiled_predict(backend: str):
    """``DinoDetr.predict_padded`` compiled once per backend (the model is an argument, so copies
    of a model, e.g. its EMA, never call the original)."""
    return torch.compile(DinoDetr.predict_padded, backend=backend, dynamic=True)
