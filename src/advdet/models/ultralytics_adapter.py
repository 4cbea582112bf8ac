"""ultralytics YOLO (v3u, v5u, v8, v9, 11, 12, ...) behind the Detector contract: the optional extra
``advdet[ultralytics]``.

ultralytics is AGPL-3.0, so it is never a core dependency of advdet: this module imports it only when a
model is built (``pip install 'advdet[ultralytics]'``); without it the builders raise
:class:`UltralyticsMissing` (an ``AdvdetError``: one line at the CLI) and every other part of advdet works.

What it wraps: any ultralytics *detection* model (``DetectionModel`` whose last layer is the anchor-free
``Detect`` head with DFL box regression), built from its yaml with no download
(``ultralytics_detector("yolov8n.yaml", num_classes=5)``: the scale letter picks the ``n`` row of
``yolov8.yaml``, exactly as ``YOLO("yolov8n.yaml")`` does; ``"yolo11n.yaml"`` works the same way), or read
from a local file (:func:`load_ultralytics`). NMS-free end-to-end heads (YOLOv10, YOLO26) and the
segment/pose/OBB heads are refused with a clear error.

Import side effects are tamed by :func:`advdet.models.ultralytics_import.import_ultralytics`.

Safety of ``.pt`` files: an ultralytics ``.pt`` is a pickle of the whole model object, and unpickling runs
whatever code the file names. advdet never unpickles one by default. It reads a ``.pt`` with ultralytics'
restricted loader (``torch_safe_load(..., safe_only=True)``: ``torch.load(weights_only=True)`` with an
allow-list of ultralytics and torch layer classes, so no arbitrary code runs), keeps only the model's yaml
and its float state dict, and rebuilds a fresh model from them. A file the restricted loader refuses
(custom layers, an old layout) is loaded only with the explicit opt-in ``trust_pickle=True`` (or
``ADVDET_TRUST_PICKLE=1`` in the environment for the CLI), which unpickles it fully: do that only for files
you made or trust. Better: convert once with :func:`save_ultralytics` to safetensors plus a JSON card that
stores the yaml, and pass that file from then on (no pickle at all).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advdet.data.errors import AdvdetError
from advdet.models.detector import Detector, DenseOutput, check_finite, check_targets
from advdet.models.ultralytics_import import UltralyticsMissing, available, import_ultralytics
from advdet.models.hub import ModelInfo, register_model
from advdet.models.weights import CheckpointError, check_fit, load_weights, read_card, save_weights

__all__ = [
    "UltralyticsMissing",
    "YoloNMS",
    "ULTRALYTICS_VAL_NMS",
    "ULTRALYTICS_HYP",
    "UltralyticsDetector",
    "available",
    "import_ultralytics",
    "ultralytics_detector",
    "load_ultralytics",
    "save_ultralytics",
    "yolov8_backbone_pretrain",
]


@dataclass(frozen=True)
class YoloNMS:
    """Arguments of ultralytics' ``non_max_suppression`` used by ``predict``."""

    conf_thres: float = 0.001
    iou_thres: float = 0.7
    multi_label: bool = True
    agnostic: bool = False
    max_det: int = 300


#: what ``yolo val`` uses (DetectionValidator: conf 0.001, IoU 0.7, multi-label, 300 detections): mAP
#: numbers are comparable with ultralytics' own. ``YoloNMS(conf_thres=0.25, multi_label=False)`` is its
#: ``predict`` default.
ULTRALYTICS_VAL_NMS = YoloNMS()
#: indices of yolov8.yaml's backbone layers (Conv, C2f, ..., SPPF): what ``yolov8_pre`` pretrains
YOLOV8_BACKBONE_LAYERS = tuple(range(10))
#: loss gains of ultralytics' default.yaml (box 7.5, cls 0.5, dfl 1.5)
ULTRALYTICS_HYP = {"box": 7.5, "cls": 0.5, "dfl": 1.5}


def _detect_head(model: nn.Module):
    from ultralytics.nn.modules.head import Detect

    head = model.model[-1]
    if type(head) is not Detect:
        kind = type(head).__name__
        raise AdvdetError(f"ultralytics model with a {kind} head: the adapter wraps detection models whose last "
                          f"layer is Detect (YOLOv3u/v5u/v8/v9/11/12); segment, pose, OBB, world and "
                          f"NMS-free end-to-end heads (YOLOv10, YOLO26) are not supported")
    if getattr(head, "one2one_cv2", None) is not None:
        raise AdvdetError("ultralytics model with an end-to-end (one-to-one) Detect head (YOLOv10/YOLO26 style): "
                          "not supported by the adapter; build a model without end2end")
    return head


class UltralyticsDetector(Detector):
    """An ultralytics detection model behind the Detector contract.

    Args:
        model: an ultralytics ``DetectionModel`` (last layer ``Detect`` with DFL, no end-to-end branch).
        input_size: S, the letterboxed input side (a multiple of the largest stride, 32).
        nms: ``predict``'s arguments to ultralytics' ``non_max_suppression`` (default: ``yolo val``'s).
        hyp: loss gains ``box``, ``cls``, ``dfl`` (default: ultralytics' 7.5, 0.5, 1.5).

    Input (every method): ``x`` float32 (B, 3, S, S) RGB in [0, 1], what ultralytics itself feeds its models
    (no mean/std), so gradients reach raw pixels.

    ``dense(x) -> DenseOutput`` with N = sum over the strides s of (S/s)^2 anchor points (1344 at 256 px),
    ordered by level (stride 8, 16, 32), then row, column (ultralytics' ``make_anchors`` order):

    - ``logits`` (B, N, K): the class logits before the sigmoid (``score_mode == "sigmoid"``); no objectness;
    - ``boxes`` (B, N, 4): xyxy in input pixels, the DFL expectation of the four edge distances around the
      anchor point times the stride (what the head's inference path decodes), not clipped;
    - ``anchors`` (B, N, 4): stride-sized boxes centred on the anchor points;
    - ``extra["pred"]`` (B, 4 + K, N): ultralytics' own inference tensor (xywh boxes, sigmoid scores), the
      input of its NMS; ``extra["box_dist"]`` (B, N, 4 * reg_max): the raw DFL logits;
      ``extra["bbox_regression"]`` (B, N, 4): their expectations, the left, top, right, bottom distances in
      strides (the typed box outputs of loc / size relevance nodes, as FCOS's);
      ``extra["num_per_level"]``, ``extra["strides"]``, ``extra["sizes"]`` (lists).

    ``predict(x) -> list[dict]``: ultralytics' ``non_max_suppression(extra["pred"], ...)`` with ``nms`` (the
    time limit lifted, so a busy machine gives the same detections), boxes clipped to the input, as its
    validator does; ``labels`` int64, ``scores`` float.

    ``loss(x, targets) -> dict``: ultralytics' ``v8DetectionLoss`` (task-aligned assignment, BCE on the class
    logits, CIoU and DFL on the boxes) with the gains ``hyp``, split by name: ``cls`` (BCE), ``loc`` (CIoU
    box loss) and ``dfl`` (distribution focal loss, also a localization term); each is normalised by the sum
    of the assigned target scores of the batch, as ultralytics does, and not multiplied by the batch size
    (ultralytics' trainer does that, for its own learning-rate scaling). ``targets``: B dicts with ``boxes``
    (G, 4) xyxy in input pixels and ``labels`` (G,) int64 in 0..K-1. ``per_image_loss`` gives each image's
    losses as if it were alone, from one forward pass.
    """

    family = "ultralytics"

    def __init__(self, model: nn.Module, input_size: int = 640, nms: YoloNMS = ULTRALYTICS_VAL_NMS,
                 hyp: dict | None = None):
        head = _detect_head(model)
        super().__init__(model, int(head.nc), input_size)
        self.nms = nms
        self.hyp = dict(ULTRALYTICS_HYP, **(hyp or {}))
        self._criterion = None

    @property
    def head(self):
        return self.model.model[-1]

    # ------------------------------------------------------------------------------------------- dense
    def _raw(self, x: torch.Tensor) -> dict:
        self.check_input(x)
        out = self.model(x)
        preds = out[1] if isinstance(out, tuple) else out  # eval: (inference tensor, raw dict); train: raw dict
        if not isinstance(preds, dict) or "boxes" not in preds:
            raise RuntimeError(f"unexpected ultralytics Detect output {type(preds).__name__}")
        return preds

    def _dense_from(self, preds: dict, x: torch.Tensor) -> DenseOutput:
        from ultralytics.utils.ops import xywh2xyxy
        from ultralytics.utils.tal import make_anchors

        head = self.head
        feats = preds["feats"]
        anchor_pts, stride_t = (a.transpose(0, 1) for a in make_anchors(feats, head.stride, 0.5))  # (2, N), (1, N)
        # exactly the head's inference decode (Detect._get_decode_boxes), without touching its cached anchors
        dist = head.dfl(preds["boxes"])  # (B, 4, N) DFL expectation of the edge distances, in strides
        dbox = head.decode_bboxes(dist, anchor_pts.unsqueeze(0)) * stride_t  # (B, 4, N)
        scores = preds["scores"]  # (B, K, N) logits
        pred = torch.cat((dbox, scores.sigmoid()), 1)
        boxes = dbox.transpose(1, 2)
        if not head.xyxy:
            boxes = xywh2xyxy(boxes)
        b = x.shape[0]
        pts = (anchor_pts * stride_t).transpose(0, 1)  # (N, 2) pixels
        half = stride_t.transpose(0, 1) / 2
        anchors = torch.cat([pts - half, pts + half], 1).expand(b, -1, 4)
        logits = scores.transpose(1, 2)
        check_finite("ultralytics.dense", logits=logits, boxes=boxes)
        sizes = [(f.shape[2], f.shape[3]) for f in feats]
        return DenseOutput(logits=logits, boxes=boxes, anchors=anchors, score_mode="sigmoid", extra={
            "pred": pred, "box_dist": preds["boxes"].transpose(1, 2), "bbox_regression": dist.transpose(1, 2),
            "num_per_level": [h * w for h, w in sizes], "strides": [float(s) for s in head.stride],
            "sizes": sizes})

    def dense(self, x: torch.Tensor) -> DenseOutput:
        return self._dense_from(self._raw(x), x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> list[dict]:
        return self.postprocess(self.dense(x).extra["pred"], x.shape[-1])

    def postprocess(self, pred: torch.Tensor, image_size: int) -> list[dict]:
        """ultralytics' NMS on its inference tensor ``pred`` (B, 4 + K, N), boxes clipped to the input."""
        from ultralytics.utils.nms import non_max_suppression

        c = self.nms
        out = non_max_suppression(pred.detach(), c.conf_thres, c.iou_thres, agnostic=c.agnostic,
                                  multi_label=c.multi_label, max_det=c.max_det, nc=self.num_classes,
                                  max_time_img=math.inf)
        return [{"boxes": d[:, :4].clamp(0, image_size), "scores": d[:, 4], "labels": d[:, 5].long()} for d in out]

    def feature_layers(self) -> dict[str, nn.Module]:
        """The backbone maps the neck reads (P3, P4 and the last backbone layer, SPPF, for YOLOv8): every
        backbone layer that a later layer takes as input, plus the last one, as ``model.model.I``."""
        nb = len(self.model.yaml.get("backbone", []))
        refs = {nb - 1}
        for m in list(self.model.model)[nb:]:
            for j in (m.f if isinstance(m.f, list) else [m.f]):
                if 0 <= j < nb:
                    refs.add(j)
        return {f"model.model.{i}": self.model.model[i] for i in sorted(refs)}

    # ------------------------------------------------------------------------------------------- loss
    def _targets_batch(self, targets: list[dict], x: torch.Tensor) -> dict:
        b, dev = x.shape[0], x.device
        check_targets("ultralytics.loss", targets, b, self.num_classes)
        h, w = x.shape[2], x.shape[3]
        idx, cls, boxes = [], [], []
        for i, t in enumerate(targets):
            bx, lb = t["boxes"].to(dev, torch.float32), t["labels"].to(dev)
            scale = bx.new_tensor([w, h, w, h])
            xywh = torch.cat([(bx[:, :2] + bx[:, 2:]) / 2, bx[:, 2:] - bx[:, :2]], 1) / scale
            idx.append(torch.full((len(bx),), float(i), device=dev))
            cls.append(lb.float())
            boxes.append(xywh)
        return {"batch_idx": torch.cat(idx), "cls": torch.cat(cls).view(-1, 1), "bboxes": torch.cat(boxes)}

    def criterion(self):
        """ultralytics' ``v8DetectionLoss`` for this model (built on first use, rebuilt after a device move)."""
        dev = self.device
        if self._criterion is None or self._criterion.device != dev:
            from ultralytics.utils import IterableSimpleNamespace
            from ultralytics.utils.loss import v8DetectionLoss

            self.model.args = IterableSimpleNamespace(**self.hyp)
            self._criterion = v8DetectionLoss(self.model)
        return self._criterion

    def _named(self, parts: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cls": parts[1], "loc": parts[0], "dfl": parts[2]}

    def loss(self, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        batch = self._targets_batch(targets, x)
        preds = self._raw(x)
        return self._named(self.criterion().get_assigned_targets_and_loss(preds, batch)[1])

    def per_image_loss(self, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Each image's ``loss`` as if it were alone in its batch (name -> (B,)), from one forward pass (the
        model's current mode: call ``.eval()`` first so that batch norm does not mix the images)."""
        self._targets_batch(targets, x)  # checks
        preds = self._raw(x)
        crit = self.criterion()
        rows = []
        for i in range(x.shape[0]):
            one = {"boxes": preds["boxes"][i:i + 1], "scores": preds["scores"][i:i + 1],
                   "feats": [f[i:i + 1] for f in preds["feats"]]}
            rows.append(crit.get_assigned_targets_and_loss(one, self._targets_batch([targets[i]], x[i:i + 1]))[1])
        return self._named(torch.stack(rows, 1))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, input_size={self.input_size}, nms={self.nms}"


# ----------------------------------------------------------------------------------------------- builders
def _build(cfg: Any, num_classes: int | None) -> nn.Module:
    import_ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    try:
        return DetectionModel(cfg, nc=num_classes, verbose=False)
    except FileNotFoundError as err:
        raise AdvdetError(f"ultralytics model yaml {cfg!r} not found ({err}); name a bundled yaml such as "
                          f"'yolov8n.yaml' or 'yolo11s.yaml', or a path to your own") from None


def ultralytics_detector(cfg: str | os.PathLike | dict = "yolov8n.yaml", *, num_classes: int | None = None,
                         input_size: int = 640, weights: str | os.PathLike | None = None,
                         trust_pickle: bool | None = None, nms: YoloNMS = ULTRALYTICS_VAL_NMS) -> UltralyticsDetector:
    """An ultralytics detection model from its yaml (a bundled name like ``yolov8n.yaml``, a path, or the
    yaml as a dict), randomly initialised with ``num_classes`` classes (default: the yaml's ``nc``), in eval
    mode; nothing is downloaded. ``weights``: a local ``.pt`` or ``.safetensors`` file, see
    :func:`load_ultralytics` (its architecture must then be the yaml's)."""
    if input_size % 32:
        raise ValueError(f"ultralytics: input_size must be a multiple of 32, got {input_size}")
    if weights is not None:
        det = load_ultralytics(weights, input_size=input_size, trust_pickle=trust_pickle, nms=nms)
        if num_classes is not None and det.num_classes != num_classes:
            raise CheckpointError(f"{weights}: has {det.num_classes} classes, not {num_classes}")
        return det
    return UltralyticsDetector(_build(cfg, num_classes), input_size, nms=nms).eval()


def _file_in_name(spec: str) -> Path | None:
    return Path(spec) if spec.endswith((".pt", ".safetensors")) else None


@register_model("ultralytics:", family="ultralytics", weights_in_name=_file_in_name, names=lambda: [ModelInfo(
    "ultralytics:yolov8n.yaml", "ultralytics", "detector", False, True, "any bundled yaml, or a local .pt / "
    ".safetensors file (advdet[ultralytics], AGPL-3.0)")] if available() else [])
def ultralytics_model(spec: str, *, weights=None, pretrained: bool = True, num_classes: int | None = None,
                      input_size: int | None = None) -> UltralyticsDetector:
    """The hub's ``ultralytics:YAML`` (random, or ``weights``) and ``ultralytics:FILE.pt|.safetensors``."""
    if _file_in_name(spec) is not None and weights is None:
        det = load_ultralytics(spec, input_size=input_size or 640)
        if num_classes is not None and det.num_classes != num_classes:
            raise CheckpointError(f"{spec}: has {det.num_classes} classes, not {num_classes}")
        return det
    return ultralytics_detector(spec, num_classes=num_classes, input_size=input_size or 640, weights=weights)


def _trusted(trust_pickle: bool | None) -> bool:
    if trust_pickle is None:
        return os.environ.get("ADVDET_TRUST_PICKLE", "") in ("1", "true", "yes")
    return bool(trust_pickle)


def _read_pt(path: Path, trust_pickle: bool) -> tuple[dict, dict[str, torch.Tensor], dict | None]:
    """(yaml, float state dict, names) of an ultralytics ``.pt`` checkpoint."""
    import_ultralytics()
    from ultralytics.nn.tasks import torch_safe_load

    try:
        ckpt, _ = torch_safe_load(str(path), safe_only=not trust_pickle)
    except TypeError as err:
        if trust_pickle:
            raise CheckpointError(f"{path}: not a loadable ultralytics checkpoint ({err})") from None
        raise CheckpointError(
            f"{path}: refused by the restricted loader (weights_only with ultralytics' allow-list): it holds "
            f"objects outside the known layer classes. If you made or trust this file, load it once with "
            f"trust_pickle=True (CLI: ADVDET_TRUST_PICKLE=1), which unpickles it fully, and save it with "
            f"advdet.models.ultralytics_adapter.save_ultralytics") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ultralytics checkpoint ({err})") from None
    model = None
    if isinstance(ckpt, dict):
        model = ckpt.get("ema") if ckpt.get("ema") is not None else ckpt.get("model")
    if not isinstance(model, nn.Module) or not isinstance(getattr(model, "yaml", None), dict):
        raise CheckpointError(f"{path}: not an ultralytics checkpoint (no 'model' with a yaml)")
    state = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    return dict(model.yaml), state, getattr(model, "names", None)


def load_ultralytics(path: str | os.PathLike, *, input_size: int = 640, trust_pickle: bool | None = None,
                     nms: YoloNMS = ULTRALYTICS_VAL_NMS) -> UltralyticsDetector:
    """A detector from a local file, nothing downloaded:

    - ``.safetensors`` written by :func:`save_ultralytics` (the yaml is in its JSON card): no pickle;
    - ``.pt`` from ultralytics (``best.pt``, ``yolov8n.pt`` on disk): read with ultralytics' restricted
      loader (``weights_only=True`` and its allow-list); a fresh model is built from the checkpoint's yaml and
      its weights are copied in (the unpickled objects are dropped). Files the restricted loader refuses need
      ``trust_pickle=True`` (or ``ADVDET_TRUST_PICKLE=1``): a full unpickle, for files you trust only.

    Raises ``CheckpointError`` naming the file."""
    p = Path(path)
    if not p.is_file():  # before ultralytics sees a bare name, which it would try to download
        raise CheckpointError(f"{p}: weights file not found")
    if p.suffix == ".pt":
        yaml, state, _names = _read_pt(p, _trusted(trust_pickle))
        model = _build(yaml, yaml.get("nc"))
        check_fit(model, state, p, allow_unexpected=True, hint="the model its yaml builds")
        model.load_state_dict(state, strict=False)
        return UltralyticsDetector(model, input_size, nms=nms).eval()
    if p.suffix == ".safetensors":
        yaml = read_card(p).get("ultralytics_yaml")
        if not isinstance(yaml, dict):
            raise CheckpointError(f"{p}: its card ({p.with_suffix('.json').name}) has no 'ultralytics_yaml'; "
                                  f"pass the yaml as the model name (ultralytics:yolov8n.yaml --weights {p.name})")
        det = UltralyticsDetector(_build(yaml, yaml.get("nc")), input_size, nms=nms)
        load_weights(det, p)
        return det.eval()
    raise CheckpointError(f"{p}: expected an ultralytics .pt or an advdet .safetensors file")


def save_ultralytics(det: UltralyticsDetector, path: str | os.PathLike, card: dict | None = None) -> dict:
    """Save ``det`` as safetensors plus a JSON card holding its yaml (``ultralytics_yaml``), so that
    :func:`load_ultralytics` rebuilds it with no pickle; returns the card."""
    import json

    yaml = json.loads(json.dumps(det.model.yaml, default=str))
    yaml["nc"] = det.num_classes
    return save_weights(det, path, dict(card or {}, family="ultralytics", ultralytics_yaml=yaml,
                                        num_classes=det.num_classes, input_size=det.input_size))


def yolov8_backbone_pretrain(*, num_classes: int, input_size: int = 96, cfg: str = "yolov8n.yaml") -> nn.Module:
    """The backbone of an ultralytics yaml (its ``backbone:`` layers, for ``yolov8n.yaml`` the CSP-Darknet with
    C2f blocks up to SPPF) with a linear head, for pretraining on the procedural set (the zoo's ``yolov8_pre``):
    ``body.I.`` = the detector's ``model.model.I.``; no input normalisation, as ultralytics."""
    from advdet.models.pretrained_backbone import BackboneClassifier

    net = _build(cfg, 1)
    nb = len(net.yaml["backbone"])
    layers = list(net.model)[:nb]
    if any(m.f != -1 for m in layers):
        raise AdvdetError(f"{cfg}: its backbone is not a plain sequence (a layer takes another input than the "
                          f"previous one), so it cannot be pretrained as a classifier body")
    convs = [c for c in nn.Sequential(*layers).modules() if isinstance(c, nn.Conv2d)]
    return BackboneClassifier(nn.Sequential(*layers), convs[-1].out_channels, num_classes, input_size,
                              mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
