"""YOLOv3 (Redmon & Farhadi, 2018) behind the Detector contract: anchors, decoding, post-processing and the
loss, on the network of :mod:`advdet.models.yolov3_net` (Darknet-53 in ``yolov3.cfg`` order).

Loss (keras-yolo3 / Darknet, which the RAD reference code uses): each ground-truth box goes to its
best anchor by shape IoU (all 9 anchors, boxes centred together) at that anchor's scale, in the cell
holding its centre. Box terms: BCE on sigmoid(tx, ty) against the in-cell offset plus
0.5 * squared error on (tw, th) against log(gt / anchor), both weighted by 2 - w*h / S^2. Objectness:
BCE, positives towards 1 and negatives towards 0, where a non-positive candidate whose decoded box
overlaps any ground truth of its image with IoU > 0.5 is ignored. Class: BCE (one-hot, per class) on
positives. Every term is a sum over candidates divided by the batch size B (so it does not depend
on the number of boxes per batch; the xy BCE against soft targets has a non-zero floor, so ``loc``
does not reach 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from advdet.models.box_ops import cxcywh_to_xyxy
from advdet.models.detector import Detector, DenseOutput, NMSConfig, check_finite, check_targets, postprocess_dense
from advdet.models.hub import ModelInfo, register_model
from advdet.models.yolov3_net import YOLOv3Net

__all__ = ["COCO_ANCHORS", "ANCHOR_MASKS", "YOLO_NMS", "YOLOv3Detector", "yolov3", "yolov3_small", "DARKNET_MODELS"]

#: The YOLOv3 COCO anchors (w, h) in pixels at 416 px, small to large (yolov3.cfg).
COCO_ANCHORS: tuple[tuple[float, float], ...] = (
    (10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326))
#: Anchor indices used by each output, in output order (strides 32, 16, 8), as the cfg's ``mask=``.
ANCHOR_MASKS: tuple[tuple[int, ...], ...] = ((6, 7, 8), (3, 4, 5), (0, 1, 2))
#: YOLO-style test-time post-processing (Darknet/keras-yolo3 use conf 0.005, NMS 0.45).
YOLO_NMS = NMSConfig(score_thresh=0.005, nms_thresh=0.45, pre_nms_topk=1000, max_detections=100)


def _bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none")


class YOLOv3Detector(Detector):
    """YOLOv3 behind the Detector contract.

    Args:
        model: a :class:`YOLOv3Net` with ``model.num_classes == num_classes``.
        num_classes: K, foreground classes (no background).
        input_size: S, the letterboxed input side; the default anchors are the COCO anchors times S/416.
        anchors: 9 anchors (w, h) in input pixels, small to large; output i uses ``anchor_masks[i]``.
        anchor_masks: anchor indices per output, in output order (strides 32, 16, 8).
        nms: post-processing of ``predict`` (default :data:`YOLO_NMS`: score 0.005, NMS 0.45,
            1000 candidates before NMS, 100 detections).

    Input (every method): ``x`` float32 (B, 3, S, S) RGB in [0, 1], S a multiple of 32; YOLO takes it
    as it is (no mean/std), so gradients reach raw pixels. Anchors are fixed in pixels, so another S
    works but changes the anchor-to-image ratio.

    ``dense(x) -> DenseOutput`` with N = sum over the three scales of (S/s)^2 * 3 (10647 at 416 px),
    candidates ordered by scale (32, 16, 8), then row, column, anchor (the keras-yolo3 layout RAD used):

    - ``logits`` (B, N, K): class logits, read with sigmoid (``score_mode == "sigmoid"``);
    - ``objectness`` (B, N): objectness logits;
    - ``boxes`` (B, N, 4): xyxy in input pixels, cx = (sigmoid(tx) + gx) * s, w = anchor_w * exp(tw)
      (tw, th clamped at 10 inside exp), not clipped;
    - ``anchors`` (B, N, 4): the anchor boxes, xyxy, centred on their cells;
    - ``extra["raw"]`` (B, N, 5+K): the raw conv outputs (tx, ty, tw, th, obj, classes) and
      ``extra["num_per_level"]`` / ``extra["strides"]`` / ``extra["sizes"]``: candidates, stride and
      (H, W) of each scale (lists).

    ``predict(x) -> list[dict]``: per image ``boxes`` (M, 4) float xyxy clipped to the input,
    ``scores`` (M,) = sigmoid(obj) * sigmoid(cls), ``labels`` (M,) int64 in 0..K-1; exactly
    ``postprocess_dense(dense(x), nms, S)``, M <= ``nms.max_detections``. Runs in the module's
    current mode (call ``.eval()`` first, as with torchvision).

    ``loss(x, targets) -> dict``: ``targets`` is a list of B dicts with ``boxes`` (G, 4) xyxy in input
    pixels (positive width and height; G may be 0) and ``labels`` (G,) int64 in 0..K-1. Returns
    scalar tensors ``loc`` (xy BCE + wh squared error), ``obj`` and ``cls`` (see the module docstring),
    each summed over candidates and divided by B; the training loss is their sum.

    Capabilities: ``loss_is_batch_mean`` (sums over candidates divided by B: the loss of a batch is the mean
    of its images' losses); ``objectness_nodes`` (RAD's class node is the objectness logit);
    ``dense().box_deltas`` = ``raw[..., :4]`` (tx, ty, tw, th).
    """

    family = "yolov3"
    loss_is_batch_mean = True
    objectness_nodes = True
    #: two images per RAD relevance graph on the CPU: 20 % less CPU time than one on the zoo yolov3, a batch
    #: of 8 peaks at 1.34 GB (docs/rad.md "Cost"; ssd_vgg, by contrast, is 1-15 % slower with two)
    relevance_cpu_micro_batch = 2

    def __init__(self, model: YOLOv3Net, num_classes: int, input_size: int,
                 anchors: Sequence[Sequence[float]] | None = None,
                 anchor_masks: Sequence[Sequence[int]] = ANCHOR_MASKS, nms: NMSConfig = YOLO_NMS):
        super().__init__(model, num_classes, input_size)
        if model.num_classes != num_classes:
            raise ValueError(f"YOLOv3Detector: model has {model.num_classes} classes, not {num_classes}")
        if anchors is None:
            anchors = [(w * input_size / 416, h * input_size / 416) for w, h in COCO_ANCHORS]
        anchors_t = torch.as_tensor(anchors, dtype=torch.float32)
        masks = [list(m) for m in anchor_masks]
        if anchors_t.ndim != 2 or anchors_t.shape[1] != 2 or (anchors_t <= 0).any():
            raise ValueError(f"YOLOv3Detector: anchors must be positive (w, h) pairs, got {anchors}")
        if len(masks) != 3 or any(len(m) != model.num_anchors for m in masks) or sorted(
                sum(masks, [])) != list(range(anchors_t.shape[0])):
            raise ValueError(f"YOLOv3Detector: anchor_masks {anchor_masks} must split the "
                             f"{anchors_t.shape[0]} anchors into 3 groups of {model.num_anchors}")
        self.register_buffer("anchor_wh", anchors_t)  # (9, 2) pixels
        self.anchor_masks = masks
        # anchor index -> (output level, slot within level)
        level_of = torch.zeros(anchors_t.shape[0], dtype=torch.long)
        slot_of = torch.zeros(anchors_t.shape[0], dtype=torch.long)
        for lvl, m in enumerate(masks):
            for j, a in enumerate(m):
                level_of[a], slot_of[a] = lvl, j
        self.register_buffer("_anchor_level", level_of, persistent=False)
        self.register_buffer("_anchor_slot", slot_of, persistent=False)
        self.nms = nms

    # ---------------------------------------------------------------- layout of the candidates
    def _meta(self, sizes: list[tuple[int, int]], img_hw: tuple[int, int], device: torch.device):
        """Per candidate (N,): cell xy (N, 2), stride xy (N, 2), anchor wh (N, 2); and level offsets."""
        a = self.model.num_anchors
        cells, strides, whs, offsets, off = [], [], [], [], 0
        for lvl, (h, w) in enumerate(sizes):
            gy, gx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                                    indexing="ij")
            cell = torch.stack([gx, gy], -1).reshape(h * w, 1, 2).expand(h * w, a, 2).reshape(-1, 2)
            cells.append(cell.float())
            s = torch.tensor([img_hw[1] / w, img_hw[0] / h], device=device)
            strides.append(s.expand(h * w * a, 2))
            wh = self.anchor_wh[self.anchor_masks[lvl]].to(device)  # (A, 2)
            whs.append(wh.repeat(h * w, 1))
            offsets.append(off)
            off += h * w * a
        return torch.cat(cells), torch.cat(strides), torch.cat(whs), offsets

    def dense(self, x: torch.Tensor) -> DenseOutput:
        self.check_input(x)
        outs = self.model(x)
        b, k, a = x.shape[0], self.num_classes, self.model.num_anchors
        raw = torch.cat([p.view(b, a, 5 + k, p.shape[2], p.shape[3]).permute(0, 3, 4, 1, 2)
                         .reshape(b, -1, 5 + k) for p in outs], 1)
        sizes = [(p.shape[2], p.shape[3]) for p in outs]
        cell, stride, anchor_wh, _ = self._meta(sizes, (x.shape[2], x.shape[3]), x.device)
        cxy = (raw[..., 0:2].sigmoid() + cell) * stride
        wh = anchor_wh * torch.exp(raw[..., 2:4].clamp(max=10.0))
        boxes = cxcywh_to_xyxy(torch.cat([cxy, wh], -1))
        anchors = cxcywh_to_xyxy(torch.cat([(cell + 0.5) * stride, anchor_wh], -1)).expand(b, -1, 4)
        logits, obj = raw[..., 5:], raw[..., 4]
        check_finite("yolov3.dense", logits=logits, objectness=obj, boxes=boxes)
        return DenseOutput(logits=logits, boxes=boxes, anchors=anchors, score_mode="sigmoid",
                           objectness=obj, box_deltas=raw[..., :4], extra={
                               "raw": raw, "num_per_level": [h * w * a for h, w in sizes],
                               "strides": [x.shape[-1] / w for _, w in sizes], "sizes": sizes})

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> list[dict]:
        return postprocess_dense(self.dense(x), self.nms, x.shape[-1])

    def feature_layers(self) -> dict[str, nn.Module]:
        """The three Darknet-53 stages the head reads, C3, C4, C5 (strides 8, 16, 32; cfg layers 36, 61,
        74), as mmdetection's ``Darknet`` backbone returns them (``out_indices=(3, 4, 5)``):
        ``model.stages.2``, ``model.stages.3``, ``model.stages.4``."""
        n = len(self.model.stages)
        return {f"model.stages.{i}": self.model.stages[i] for i in range(n - 3, n)}

    # ---------------------------------------------------------------- training loss
    def loss(self, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        b = x.shape[0]
        check_targets("yolov3.loss", targets, b, self.num_classes)
        dense = self.dense(x)
        raw = dense.extra["raw"]  # (B, N, 5+K)
        n, k, a = raw.shape[1], self.num_classes, self.model.num_anchors
        dev = raw.device
        sizes = dense.extra["sizes"]
        cell, stride, anchor_wh, offsets = self._meta(sizes, (x.shape[2], x.shape[3]), dev)

        gt_boxes = torch.cat([t["boxes"].to(dev, torch.float32) for t in targets])
        gt_labels = torch.cat([t["labels"].to(dev, torch.long) for t in targets])
        gt_img = torch.cat([torch.full((len(t["boxes"]),), i, dtype=torch.long, device=dev)
                            for i, t in enumerate(targets)])

        obj_target = torch.zeros(b, n, device=dev)
        pos_flat = torch.zeros(0, dtype=torch.long, device=dev)
        loc = raw.new_zeros(())
        cls = raw.new_zeros(())
        if gt_boxes.shape[0]:
            gwh = gt_boxes[:, 2:] - gt_boxes[:, :2]
            gc = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
            # best anchor by shape IoU (boxes sharing a centre)
            inter = torch.minimum(gwh[:, None], self.anchor_wh[None]).prod(-1)
            union = gwh.prod(-1)[:, None] + self.anchor_wh.prod(-1)[None] - inter
            best = (inter / union).argmax(1)
            level, slot = self._anchor_level[best], self._anchor_slot[best]
            hs = torch.tensor([h for h, _ in sizes], device=dev)[level]
            ws = torch.tensor([w for _, w in sizes], device=dev)[level]
            lvl_stride = torch.stack([x.shape[-1] / ws, x.shape[-2] / hs], -1)
            cell_xy = (gc / lvl_stride).floor().long()
            gx = cell_xy[:, 0].clamp(0, None).minimum(ws - 1)
            gy = cell_xy[:, 1].clamp(0, None).minimum(hs - 1)
            idx = torch.tensor(offsets, device=dev)[level] + (gy * ws + gx) * a + slot
            # two boxes on one (cell, anchor): the later one wins, deterministically (as in Darknet)
            owner = torch.full((b * n,), -1, dtype=torch.long, device=dev)
            owner.scatter_reduce_(0, gt_img * n + idx, torch.arange(len(idx), device=dev), "amax")
            pos_flat = torch.nonzero(owner >= 0).squeeze(1)
            g = owner[pos_flat]
            p_raw = raw.reshape(b * n, 5 + k)[pos_flat]
            p_n = pos_flat % n
            t_xy = (gc[g] / stride[p_n] - cell[p_n]).clamp(0, 1)
            t_wh = torch.log(gwh[g] / anchor_wh[p_n])
            scale = 2.0 - gwh[g].prod(-1) / (x.shape[-1] * x.shape[-2])
            loc = (scale * (_bce(p_raw[:, 0:2], t_xy).sum(-1)
                            + 0.5 * (p_raw[:, 2:4] - t_wh).pow(2).sum(-1))).sum()
            onehot = F.one_hot(gt_labels[g], k).to(p_raw.dtype)
            cls = _bce(p_raw[:, 5:], onehot).sum()
            obj_target.view(-1)[pos_flat] = 1.0

        # ignore non-positive predictions that already overlap a ground truth well
        weight = torch.ones(b, n, device=dev)
        pred_boxes = dense.boxes.detach()
        for i, t in enumerate(targets):
            if len(t["boxes"]):
                best_iou = box_iou(pred_boxes[i], t["boxes"].to(dev, torch.float32)).amax(1)
                weight[i] = (best_iou <= 0.5).float()
        weight.view(-1)[pos_flat] = 1.0
        obj = (_bce(dense.objectness, obj_target) * weight).sum()
        return {"loc": loc / b, "obj": obj / b, "cls": cls / b}


def yolov3(*, num_classes: int = 80, input_size: int = 416, width: float = 1.0, depth: float = 1.0,
           anchors: Sequence[Sequence[float]] | None = None, nms: NMSConfig = YOLO_NMS) -> YOLOv3Detector:
    """YOLOv3 (Darknet-53, 3 scales) as a Detector; width = depth = 1 is the published model
    (61,949,149 parameters for K = 80), which loads ``yolov3.weights``. Randomly initialised."""
    if input_size % 32:
        raise ValueError(f"yolov3: input_size must be a multiple of 32, got {input_size}")
    net = YOLOv3Net(num_classes=num_classes, width=width, depth=depth)
    return YOLOv3Detector(net, num_classes, input_size, anchors=anchors, nms=nms)


def yolov3_small(*, num_classes: int, input_size: int = 256, width: float = 0.25, depth: float = 0.34,
                 anchors: Sequence[Sequence[float]] | None = None, nms: NMSConfig = YOLO_NMS
                 ) -> YOLOv3Detector:
    """The zoo's small YOLOv3 for the ``shapes`` benchmark: width 0.25, depth 0.34 (residual units
    1, 1, 3, 3, 1), COCO anchors scaled to ``input_size``."""
    return yolov3(num_classes=num_classes, input_size=input_size, width=width, depth=depth,
                  anchors=anchors, nms=nms)


#: the hub's ``darknet:`` names
DARKNET_MODELS = ("yolov3",)


@register_model("darknet:", family="darknet", names=lambda: [
    ModelInfo(f"darknet:{a}", "darknet", "detector", False, True, "the published YOLOv3 (Darknet-53), RAD's "
              "surrogate; weights=PATH: a Darknet .weights or an advdet .safetensors file") for a in DARKNET_MODELS])
def darknet_model(arch: str, *, weights=None, pretrained: bool = True, num_classes: int | None = None,
                  input_size: int | None = None) -> YOLOv3Detector:
    """The hub's ``darknet:ARCH``: the published YOLOv3 (80 classes, 416 px unless given), random or with
    ``weights``: a Darknet ``.weights`` file or a state dict (the one reader and fit check)."""
    if arch not in DARKNET_MODELS:
        raise KeyError(f"unknown Darknet model 'darknet:{arch}'; known: "
                       + ", ".join(f"darknet:{a}" for a in DARKNET_MODELS))
    model = yolov3(num_classes=num_classes or 80, input_size=input_size or 416)
    if weights is not None:
        from pathlib import Path

        if Path(weights).suffix == ".weights":
            from advdet.models.darknet_weights import load_darknet_weights

            load_darknet_weights(model, weights)
        else:
            from advdet.models.weights import load_weights

            load_weights(model, weights)
    return model.eval()
