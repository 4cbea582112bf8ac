"""RT-DETR through Hugging Face transformers behind the Detector contract: the optional extra ``advdet[hf]``.

transformers (Apache-2.0) is imported only when a model is built; without it the builders raise
:class:`TransformersMissing` (an ``AdvdetError``) and the rest of advdet works.

Models, nothing downloaded:

- a named config (:data:`RTDETR_CONFIGS`): ``rtdetr_r18`` (the published RT-DETR-R18 layout: ResNet-18-style
  body, 256-d hybrid encoder, 3 decoder layers, 300 queries), ``rtdetr_tiny`` (half the body width, 128-d,
  100 queries) and ``rtdetr_resnet_pre`` (the zoo's: the same 128-d head on advdet's TinyResNet body, the
  body ``resnet_pre`` pretrains for the torchvision families), built as
  ``RTDetrForObjectDetection(RTDetrConfig(...))``: the ResNet body comes from its config (``load_backbone``
  builds it randomly initialised; no timm, no hub);
- a local folder written by ``save_pretrained`` (``config.json`` + ``model.safetensors``), read with
  ``from_pretrained(path, local_files_only=True, use_safetensors=True)``: no pickle, no hub;
- an advdet ``.safetensors`` (``weights=``) over a named config.

``HF_HUB_OFFLINE=1`` is set (where the user has not set it) before transformers is first imported.

Relevance (RAD, ``advdet explain``): not supported. LRP through RT-DETR would need rules for multi-head
self-attention (the attention weights treated as constants, as in AttnLRP / Chefer et al., and the softmax
of the scores), for multi-scale deformable attention (bilinear sampling at predicted offsets: relevance
routed through the sampling weights, the offsets held fixed), for LayerNorm (the normaliser held fixed) and
for the query selection (top-k over encoder scores: a hard gather), plus the conservation checks the CNN
rules have. Loss- and output-based attacks (PGD on ``cls``/``loc``, DAG, CWA, ...) need only gradients and
work with RT-DETR as victim and as surrogate.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from advdet.data.errors import AdvdetError
from advdet.models.detector import Detector, DenseOutput, check_finite, check_targets
from advdet.models.hub import ModelInfo, register_model
from advdet.models.weights import CheckpointError, load_weights

__all__ = ["TransformersMissing", "RTDETR_CONFIGS", "RTDetrDetector", "available", "import_transformers",
           "rtdetr_config", "rtdetr_detector"]


class TransformersMissing(AdvdetError):
    """The ``hf`` extra (transformers) is not installed."""


def available() -> bool:
    """True when ``transformers`` (and scipy, which its Hungarian matcher needs) can be imported."""
    return importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("scipy") is not None


def import_transformers():
    """Import transformers with the hub off (``HF_HUB_OFFLINE=1`` unless set); returns the package."""
    if not available():
        raise TransformersMissing("the RT-DETR adapter needs the optional extra: pip install 'advdet[hf]'")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    return transformers


#: the zoo's RT-DETR head (encoder and decoder) sizes, shared by ``rtdetr_tiny`` and ``rtdetr_resnet_pre``
_TINY_HEAD = dict(encoder_hidden_dim=128, encoder_ffn_dim=512, hidden_expansion=0.5, encoder_attention_heads=4,
                  d_model=128, decoder_in_channels=[128, 128, 128], decoder_ffn_dim=512, decoder_attention_heads=4,
                  decoder_layers=3, num_queries=100, num_denoising=50, freeze_backbone_batch_norms=False)

#: named configs (``RTDetrConfig`` fields; ``backbone`` holds the ``RTDetrResNetConfig`` fields; ``body="tiny_resnet"``
#: replaces HF's ResNet by advdet's :class:`~advdet.models.tiny_backbone.TinyResNet`, the body of the zoo's
#: torchvision families that ``resnet_pre`` pretrains)
RTDETR_CONFIGS: dict[str, dict] = {
    "rtdetr_r18": dict(
        backbone=dict(layer_type="basic", embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                      downsample_in_bottleneck=True, out_features=["stage2", "stage3", "stage4"]),
        encoder_in_channels=[128, 256, 512], encoder_hidden_dim=256, encoder_ffn_dim=1024, hidden_expansion=0.5,
        d_model=256, decoder_in_channels=[256, 256, 256], decoder_ffn_dim=1024, decoder_layers=3,
        num_queries=300),
    "rtdetr_tiny": dict(
        backbone=dict(layer_type="basic", embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 2, 2],
                      downsample_in_bottleneck=True, out_features=["stage2", "stage3", "stage4"]),
        encoder_in_channels=[64, 128, 256], **_TINY_HEAD),
    "rtdetr_resnet_pre": dict(
        backbone=dict(layer_type="basic", embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                      out_features=["stage2", "stage3", "stage4"]),
        body="tiny_resnet", encoder_in_channels=[32, 64, 128], **_TINY_HEAD),
}


class TinyResNetBody(nn.Module):
    """advdet's :class:`~advdet.models.tiny_backbone.TinyResNet` (widths 16-128, one block per stage) as the
    backbone of an HF RT-DETR: ``forward(pixel_values)`` normalises with the ImageNet mean / std (as the
    torchvision families and ``resnet_pre``'s pretraining do) and returns an object whose ``feature_maps``
    are ``layer2`` .. ``layer4`` (strides 8, 16, 32; 32, 64, 128 channels); ``channels`` lists them. The
    body sits under ``body.``, so ``resnet_pre``'s ``body.`` tensors load into it."""

    def __init__(self):
        super().__init__()
        from advdet.models.pretrained_backbone import IMAGENET_MEAN, IMAGENET_STD
        from advdet.models.tiny_backbone import TinyResNet

        self.body = TinyResNet()
        self.channels = list(self.body.widths[1:])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        b = self.body
        x = b.layer1(b.stem((pixel_values - self.mean) / self.std))
        c3 = b.layer2(x)
        c4 = b.layer3(c3)
        return SimpleNamespace(feature_maps=(c3, c4, b.layer4(c4)))


def rtdetr_config(name: str, num_classes: int, input_size: int):
    """The ``RTDetrConfig`` of a named config (:data:`RTDETR_CONFIGS`) with ``num_classes`` labels."""
    if name not in RTDETR_CONFIGS:
        raise KeyError(f"unknown RT-DETR config {name!r}; known: {', '.join(RTDETR_CONFIGS)}, or a local "
                       f"save_pretrained folder")
    import_transformers()
    from transformers import RTDetrConfig, RTDetrResNetConfig

    kw = dict(RTDETR_CONFIGS[name])
    kw.pop("body", None)
    backbone = RTDetrResNetConfig(**kw.pop("backbone"))
    return RTDetrConfig(backbone_config=backbone, num_labels=num_classes, eval_size=None,
                        id2label={i: str(i) for i in range(num_classes)},
                        label2id={str(i): i for i in range(num_classes)}, **kw)


class RTDetrDetector(Detector):
    """A transformers ``RTDetrForObjectDetection`` behind the Detector contract.

    Args:
        model: the HF model (focal-loss scoring, the default of RT-DETR).
        input_size: S.
        score_thresh: the ``threshold`` of ``post_process_object_detection`` in ``predict`` (default 0.01: the
            low threshold mAP evaluation needs; HF's own default, 0.5, is for display).

    Input (every method): ``x`` float32 (B, 3, S, S) RGB in [0, 1]: what ``RTDetrImageProcessor`` feeds the
    model (rescale by 1/255, no mean/std), so gradients reach raw pixels.

    ``dense(x) -> DenseOutput`` with N = the number of queries Q (no NMS anywhere):

    - ``logits`` (B, Q, K): the last decoder layer's class logits, read with sigmoid;
    - ``boxes`` (B, Q, 4): its boxes as xyxy in input pixels (``pred_boxes`` are relative cxcywh);
    - ``anchors`` (B, Q, 4): the queries' initial reference boxes (the encoder's top-k proposals), xyxy pixels;
    - ``extra["pred_boxes"]`` (B, Q, 4) relative cxcywh (also ``extra["bbox_regression"]``: the typed box
      outputs of loc / size nodes), ``extra["outputs"]`` the HF output object.

    ``predict(x)``: the HF image processor's ``post_process_object_detection`` (sigmoid, top-Q over all
    (query, class) pairs, threshold) with ``target_sizes`` = (S, S); boxes are not clipped (as HF returns
    them).

    ``loss(x, targets) -> dict``: RT-DETR's loss (``RTDetrLoss``: Hungarian matching, varifocal
    classification, L1 and GIoU box terms, on the last layer, every auxiliary decoder layer, the encoder
    proposals and, in training mode, the denoising queries), each term times its config weight, summed by
    kind: ``cls`` (all ``loss_vfl*``), ``loc`` (all ``loss_bbox*``, L1) and ``giou`` (all ``loss_giou*``);
    their sum is HF's ``loss``. ``targets``: B dicts with ``boxes`` (G, 4) xyxy in input pixels and ``labels``
    (G,) int64 in 0..K-1 (converted to HF's ``class_labels`` and relative cxcywh ``boxes``). The terms are
    normalised by the number of boxes of the batch; ``per_image_loss`` gives each image's losses as if alone.
    """

    family = "rtdetr"

    def __init__(self, model: nn.Module, input_size: int = 640, score_thresh: float = 0.01):
        cfg = model.config
        if not getattr(cfg, "use_focal_loss", True):
            raise AdvdetError("RT-DETR with use_focal_loss=False (softmax scoring) is not supported by the adapter")
        super().__init__(model, int(cfg.num_labels), input_size)
        self.score_thresh = score_thresh
        self._processor = None

    # ------------------------------------------------------------------------------------------- dense
    def _forward(self, x: torch.Tensor, labels: list[dict] | None = None):
        self.check_input(x)
        return self.model(pixel_values=x, labels=labels)

    def _dense_from(self, out, x: torch.Tensor) -> DenseOutput:
        from transformers.image_transforms import center_to_corners_format

        h, w = x.shape[2], x.shape[3]
        scale = x.new_tensor([w, h, w, h])
        boxes = center_to_corners_format(out.pred_boxes) * scale
        init = out.initial_reference_points
        q = out.logits.shape[1]
        anchors = (center_to_corners_format(init[:, -q:]) * scale) if init is not None else boxes.detach()
        check_finite("rtdetr.dense", logits=out.logits, boxes=boxes)
        return DenseOutput(logits=out.logits, boxes=boxes, anchors=anchors, score_mode="sigmoid",
                           extra={"pred_boxes": out.pred_boxes, "bbox_regression": out.pred_boxes, "outputs": out})

    def dense(self, x: torch.Tensor) -> DenseOutput:
        return self._dense_from(self._forward(x), x)

    @property
    def processor(self):
        if self._processor is None:
            from transformers import RTDetrImageProcessor

            self._processor = RTDetrImageProcessor()
        return self._processor

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> list[dict]:
        d = self.dense(x)
        return self.postprocess(d.logits, d.extra["pred_boxes"], (x.shape[2], x.shape[3]))

    def postprocess(self, logits: torch.Tensor, pred_boxes: torch.Tensor, size: tuple[int, int]) -> list[dict]:
        """HF's ``post_process_object_detection`` on ``logits`` (B, Q, K) and relative cxcywh ``pred_boxes``."""
        out = SimpleNamespace(logits=logits.detach(), pred_boxes=pred_boxes.detach())
        res = self.processor.post_process_object_detection(out, threshold=self.score_thresh,
                                                           target_sizes=[tuple(size)] * logits.shape[0])
        return [{"boxes": r["boxes"], "scores": r["scores"], "labels": r["labels"].long()} for r in res]

    def feature_layers(self) -> dict[str, nn.Module]:
        """The three ResNet stages the hybrid encoder reads (strides 8, 16, 32)."""
        bb = self.model.model.backbone.model
        if isinstance(bb, TinyResNetBody):
            return {f"model.model.backbone.model.body.layer{i}": getattr(bb.body, f"layer{i}") for i in (2, 3, 4)}
        enc = bb.encoder
        n = len(enc.stages)
        return {f"model.model.backbone.model.encoder.stages.{i}": enc.stages[i] for i in range(n - 3, n)}

    # ------------------------------------------------------------------------------------------- loss
    def _labels(self, targets: list[dict], x: torch.Tensor) -> list[dict]:
        b, dev = x.shape[0], x.device
        check_targets("rtdetr.loss", targets, b, self.num_classes)
        h, w = x.shape[2], x.shape[3]
        out = []
        for i, t in enumerate(targets):
            bx, lb = t["boxes"].to(dev, torch.float32), t["labels"].to(dev, torch.long)
            scale = bx.new_tensor([w, h, w, h])
            cxcywh = torch.cat([(bx[:, :2] + bx[:, 2:]) / 2, bx[:, 2:] - bx[:, :2]], 1) / scale
            out.append({"class_labels": lb, "boxes": cxcywh})
        return out

    @staticmethod
    def _grouped(loss_dict: dict, like: torch.Tensor) -> dict[str, torch.Tensor]:
        groups = {"cls": "loss_vfl", "loc": "loss_bbox", "giou": "loss_giou"}
        out = {}
        for name, prefix in groups.items():
            parts = [v for k, v in loss_dict.items() if k == prefix or k.startswith(prefix + "_")]
            out[name] = torch.stack([p.reshape(()) for p in parts]).sum() if parts else like.new_zeros(())
        unknown = [k for k in loss_dict if not any(k == p or k.startswith(p + "_") for p in groups.values())]
        if unknown:
            raise RuntimeError(f"rtdetr.loss: unexpected loss terms {unknown}")
        return out

    def loss(self, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        out = self._forward(x, self._labels(targets, x))
        return self._grouped(out.loss_dict, out.logits)

    def per_image_loss(self, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Each image's ``loss`` as if alone (name -> (B,)): in eval mode (no denoising queries) one forward
        pass and HF's loss function per image; in training mode one ``loss`` call per image."""
        labels = self._labels(targets, x)
        if self.model.training:
            rows = [self.loss(x[i:i + 1], [targets[i]]) for i in range(x.shape[0])]
            return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        out = self._forward(x)
        m = self.model
        rows = []
        for i in range(x.shape[0]):
            s = slice(i, i + 1)
            _, loss_dict, _ = m.loss_function(
                out.logits[s], [labels[i]], x.device, out.pred_boxes[s], m.config,
                out.intermediate_logits[s], out.intermediate_reference_points[s],
                enc_topk_logits=out.enc_topk_logits[s], enc_topk_bboxes=out.enc_topk_bboxes[s],
                denoising_meta_values=None)
            rows.append(self._grouped(loss_dict, out.logits))
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, input_size={self.input_size}, score_thresh={self.score_thresh}"


def rtdetr_detector(spec: str | os.PathLike = "rtdetr_tiny", *, num_classes: int | None = None,
                    input_size: int = 640, weights: str | os.PathLike | None = None,
                    score_thresh: float = 0.01) -> RTDetrDetector:
    """RT-DETR as a Detector, in eval mode, nothing downloaded: ``spec`` a named config
    (:data:`RTDETR_CONFIGS`, random weights, ``num_classes`` labels, default 80) or a local ``save_pretrained``
    folder (its config and ``model.safetensors``); ``weights``: an advdet ``.safetensors`` for the built model.
    Raises ``CheckpointError`` naming the file for weights that do not fit."""
    import_transformers()
    from transformers import RTDetrForObjectDetection

    path = Path(spec)
    if str(spec) in RTDETR_CONFIGS:
        model = RTDetrForObjectDetection(rtdetr_config(str(spec), num_classes or 80, input_size))
        if RTDETR_CONFIGS[str(spec)].get("body") == "tiny_resnet":
            conv_encoder = model.model.backbone
            body = TinyResNetBody()
            if list(conv_encoder.intermediate_channel_sizes) != body.channels:  # the projections were built for these
                raise RuntimeError(f"{spec}: HF backbone channels {conv_encoder.intermediate_channel_sizes} "
                                   f"differ from TinyResNet's {body.channels}")
            conv_encoder.model = body
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: no config.json (expected a save_pretrained folder)")
        try:
            model = RTDetrForObjectDetection.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a loadable RT-DETR folder with model.safetensors ({err})") from None
        if num_classes is not None and model.config.num_labels != num_classes:
            raise CheckpointError(f"{path}: has {model.config.num_labels} classes, not {num_classes}")
    else:
        raise KeyError(f"unknown RT-DETR {str(spec)!r}: not a named config ({', '.join(RTDETR_CONFIGS)}) "
                       f"nor a save_pretrained folder")
    det = RTDetrDetector(model, input_size, score_thresh=score_thresh)
    if weights is not None:
        load_weights(det, weights)
    return det.eval()


def _folder_weights(spec: str) -> Path | None:
    return Path(spec) / "model.safetensors" if spec not in RTDETR_CONFIGS and Path(spec).is_dir() else None


@register_model("hf:", family="hf", weights_in_name=_folder_weights, names=lambda: [
    ModelInfo(f"hf:{n}", "hf", "detector", False, True, "RT-DETR (Hugging Face transformers, advdet[hf]); or "
              "hf:DIR, a save_pretrained folder") for n in RTDETR_CONFIGS] if available() else [])
def hf_model(spec: str, *, weights=None, pretrained: bool = True, num_classes: int | None = None,
             input_size: int | None = None) -> RTDetrDetector:
    """The hub's ``hf:CONFIG`` (a named config, random) and ``hf:DIR`` (a ``save_pretrained`` folder)."""
    return rtdetr_detector(spec, num_classes=num_classes, input_size=input_size or 640, weights=weights)
