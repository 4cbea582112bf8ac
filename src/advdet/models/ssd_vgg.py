"""SSD with a VGG16 backbone without BatchNorm, in the layout of ssd.pytorch (RobustDet's base).

ALGORITHMS.md 1.1: VGG16 (no BN) with conv4_3 at ``vgg[21]`` (its ReLU at ``vgg[22]``), L2Norm (scale 20)
on conv4_3 as source 1, pool5 3x3/s1, dilated conv6 and conv7 as source 2, four extra stages as sources
3-6, 3x3 loc/conf heads with [4, 6, 6, 6, 4, 4] priors per cell (8732 priors at 300 px), multibox loss
with IoU-0.5 matching and 3:1 hard-negative mining. ``width`` multiplies every channel count, and any
``input_size`` works (extras switch from padding-0 to stride-2 convs when a map gets too small), so a
small variant fits the zoo. Convolutions live in the plain ModuleLists ``vgg``, ``extras``, ``loc``,
``conf`` so RobustDet can swap them for dynamic convolutions and wrap conv4_3 by index.

Input normalisation follows the reference code: ``x * 255 - (104, 117, 123)`` applied to the R, G, B
channels (the BGR mean applied to RGB, ALGORITHMS.md 1.1), no division by a std.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from advdet.models.box_ops import cxcywh_to_xyxy, match_priors, ssd_decode, ssd_encode
from advdet.models.detector import Detector, DenseOutput, NMSConfig, check_finite, postprocess_dense

SSD_MEAN = (104.0, 117.0, 123.0)
VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512]
CONV4_3_INDEX = 21  # index of conv4_3 in ``vgg`` (its ReLU is 22), as in ssd.pytorch
PRIORS_PER_CELL = (4, 6, 6, 6, 4, 4)
ASPECT_RATIOS = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learnable per-channel scale (initialised to 20)."""

    def __init__(self, channels: int, scale: float = 20.0, eps: float = 1e-10):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), scale))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.pow(2).sum(1, keepdim=True).sqrt() + self.eps
        return x / norm * self.weight[None, :, None, None]


def _c(ch: int, width: float) -> int:
    return max(8, int(round(ch * width)))


def build_vgg(width: float = 1.0) -> nn.ModuleList:
    """VGG16 without BN + pool5/conv6 (dilation 6)/conv7, the ssd.pytorch ``vgg`` list."""
    layers: list[nn.Module] = []
    in_ch = 3
    for v in VGG_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        elif v == "C":
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        else:
            out = _c(v, width)
            layers += [nn.Conv2d(in_ch, out, 3, padding=1), nn.ReLU()]
            in_ch = out
    fc = _c(1024, width)
    layers += [nn.MaxPool2d(3, 1, 1), nn.Conv2d(in_ch, fc, 3, padding=6, dilation=6), nn.ReLU(),
               nn.Conv2d(fc, fc, 1), nn.ReLU()]
    return nn.ModuleList(layers)


class SSDVGGNet(nn.Module):
    """The raw SSD network: ``forward(x_normalised) -> (loc (B, P, 4), conf (B, P, K+1))``."""

    def __init__(self, num_classes: int, input_size: int = 300, width: float = 1.0):
        super().__init__()
        self.num_classes = num_classes  # foreground classes; conf has K + 1 columns
        self.vgg = build_vgg(width)
        c4, fc = _c(512, width), _c(1024, width)
        self.l2norm = L2Norm(c4)
        # extras: (1x1 reduce, 3x3 out); the 3x3 of stage i is stride 2 / pad 1 for the first two and
        # for later stages whose input is too small for a pad-0 conv, else stride 1 / pad 0.
        sizes = self._source_sizes(input_size)
        self.extras = nn.ModuleList()
        in_ch = fc
        self.source_channels = [c4, fc]
        for i, (mid, out) in enumerate(((256, 512), (128, 256), (128, 256), (128, 256))):
            mid, out = _c(mid, width), _c(out, width)
            stride2 = i < 2 or sizes[i + 1] < 3
            self.extras.append(nn.Conv2d(in_ch, mid, 1))
            self.extras.append(nn.Conv2d(mid, out, 3, stride=2 if stride2 else 1, padding=1 if stride2 else 0))
            in_ch = out
            self.source_channels.append(out)
        self.loc = nn.ModuleList(nn.Conv2d(ch, a * 4, 3, padding=1)
                                 for ch, a in zip(self.source_channels, PRIORS_PER_CELL))
        self.conf = nn.ModuleList(nn.Conv2d(ch, a * (num_classes + 1), 3, padding=1)
                                  for ch, a in zip(self.source_channels, PRIORS_PER_CELL))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _source_sizes(s: int) -> list[int]:
        """Feature-map sides of the six sources for input side ``s``."""
        s = s // 2 // 2          # pools 1, 2
        s = math.ceil(s / 2)     # ceil-mode pool 3
        c4 = s
        fc7 = s // 2             # pool 4 (pool5 and conv6/7 keep the size)
        sizes = [c4, fc7]
        cur = fc7
        for i in range(4):
            cur = (cur + 1) // 2 if (i < 2 or cur < 3) else cur - 2
            sizes.append(cur)
        return sizes

    def sources(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.vgg):
            x = layer(x)
            if i == CONV4_3_INDEX + 1:
                out.append(self.l2norm(x))
        out.append(x)
        for i in range(0, len(self.extras), 2):
            x = F.relu(self.extras[i](x))
            x = F.relu(self.extras[i + 1](x))
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        srcs = self.sources(x)
        b = x.shape[0]
        loc = torch.cat([l(s).permute(0, 2, 3, 1).reshape(b, -1, 4) for s, l in zip(srcs, self.loc)], 1)
        conf = torch.cat([c(s).permute(0, 2, 3, 1).reshape(b, -1, self.num_classes + 1)
                          for s, c in zip(srcs, self.conf)], 1)
        return loc, conf


def ssd_priors(input_size: int, fmap_sizes: list[int], min_sizes: tuple[float, ...],
               max_sizes: tuple[float, ...]) -> torch.Tensor:
    """SSD prior boxes (P, 4) as (cx, cy, w, h) in input pixels, clipped to the image (ssd.pytorch order)."""
    out = []
    for k, f in enumerate(fmap_sizes):
        step = input_size / f
        for i in range(f):
            for j in range(f):
                cx, cy = (j + 0.5) * step, (i + 0.5) * step
                s = min_sizes[k]
                out.append([cx, cy, s, s])
                s2 = math.sqrt(s * max_sizes[k])
                out.append([cx, cy, s2, s2])
                for ar in ASPECT_RATIOS[k]:
                    r = math.sqrt(ar)
                    out += [[cx, cy, s * r, s / r], [cx, cy, s / r, s * r]]
    p = torch.tensor(out, dtype=torch.float32)
    xyxy = cxcywh_to_xyxy(p).clamp(0, input_size)
    cx, cy = (xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2
    return torch.stack([cx, cy, xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], 1)


VOC_MIN_SIZES = (30, 60, 111, 162, 213, 264)
VOC_MAX_SIZES = (60, 111, 162, 213, 264, 315)


class SSDVGG(Detector):
    """SSD-VGG16 (no BN) behind the Detector contract.

    Input: (B, 3, S, S) float RGB in [0, 1], letterboxed. ``dense``: softmax-with-background logits
    (B, P, K+1), decoded xyxy boxes (B, P, 4) in input pixels, priors (B, P, 4) xyxy. ``predict``: softmax,
    score > 0.01, per-class NMS at 0.45 over the best 2000 (prior, class) pairs, at most 100 detections
    per image. ``loss``: {"loc": Smooth-L1 on positives / N, "cls": CE on positives and 3:1 hard
    negatives / N}, N = positives in the batch (ALGORITHMS.md 1.1).

    Capabilities: ``per_image_loss`` is one forward pass and one multibox loss per image slice (the loss
    normalises by the positives of the batch, so a batched loss is not a mean of per-image ones);
    ``positive_prior_losses`` and ``match_targets`` come from the prior matching; ``dense().box_deltas`` are
    the raw loc offsets; relevance passes through ``L2Norm``.
    """

    family = "ssd_vgg"
    relevance_passthrough = (L2Norm,)

    def __init__(self, num_classes: int, input_size: int = 300, width: float = 1.0,
                 min_sizes: tuple[float, ...] | None = None, max_sizes: tuple[float, ...] | None = None,
                 nms: NMSConfig = NMSConfig(score_thresh=0.01, nms_thresh=0.45, pre_nms_topk=2000,
                                            max_detections=100),
                 neg_pos_ratio: int = 3, iou_threshold: float = 0.5):
        net = SSDVGGNet(num_classes, input_size, width)
        super().__init__(net, num_classes, input_size)
        scale = input_size / 300.0
        self.min_sizes = tuple(min_sizes or (s * scale for s in VOC_MIN_SIZES))
        self.max_sizes = tuple(max_sizes or (s * scale for s in VOC_MAX_SIZES))
        self.width = width
        self.nms = nms
        self.neg_pos_ratio = neg_pos_ratio
        self.iou_threshold = iou_threshold
        sizes = SSDVGGNet._source_sizes(input_size)
        self.register_buffer("priors", ssd_priors(input_size, sizes, self.min_sizes, self.max_sizes),
                             persistent=False)
        self.register_buffer("mean", torch.tensor(SSD_MEAN).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * 255.0 - self.mean

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_input(x)
        return self.model(self.normalize(x))

    def dense(self, x: torch.Tensor) -> DenseOutput:
        loc, conf = self.raw(x)
        b = x.shape[0]
        boxes = ssd_decode(loc, self.priors[None])
        anchors = cxcywh_to_xyxy(self.priors)[None].expand(b, -1, -1)
        return DenseOutput(logits=conf, boxes=boxes, anchors=anchors, score_mode="softmax_bg",
                           box_deltas=loc, extra={"loc": loc})

    def postprocess(self, dense: DenseOutput) -> list[dict]:
        return postprocess_dense(dense, self.nms, self.input_size)

    def feature_layers(self) -> dict[str, nn.Module]:
        """The two maps the VGG trunk hands to the heads, as mmdetection's ``SSDVGG`` backbone returns them
        (``out_feature_indices=(22, 34)``): ``model.vgg.22``, the ReLU of conv4_3 before the L2Norm
        (stride 8), and ``model.vgg.34``, the ReLU of conv7 / fc7 (stride 16)."""
        last = len(self.model.vgg) - 1
        return {f"model.vgg.{CONV4_3_INDEX + 1}": self.model.vgg[CONV4_3_INDEX + 1],
                f"model.vgg.{last}": self.model.vgg[last]}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> list[dict]:
        dense = self.dense(x)
        check_finite(self.family, logits=dense.logits)
        return self.postprocess(dense)

    def encode_targets(self, targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per prior: encoded offsets (B, P, 4) and class targets (B, P), 0 = background."""
        priors_xyxy = cxcywh_to_xyxy(self.priors)
        locs, labels = [], []
        for t in targets:
            gt = t["boxes"].to(self.priors)
            idx, pos = match_priors(gt, priors_xyxy, self.iou_threshold)
            if gt.numel():
                locs.append(ssd_encode(gt[idx], self.priors))
                labels.append(torch.where(pos, t["labels"].to(self.priors.device)[idx] + 1, 0))
            else:
                locs.append(torch.zeros_like(self.priors))
                labels.append(torch.zeros(len(self.priors), dtype=torch.long, device=self.priors.device))
        return torch.stack(locs), torch.stack(labels)

    def multibox_loss(self, loc: torch.Tensor, conf: torch.Tensor, targets: list[dict],
                      reduction: str = "sum") -> dict[str, torch.Tensor]:
        """Multibox loss (ALGORITHMS.md 1.1). ``reduction="none"`` gives per-image losses (B,) / N."""
        loc_t, cls_t = self.encode_targets(targets)
        pos = cls_t > 0
        n = pos.sum().clamp(min=1).float()
        loc_l = F.smooth_l1_loss(loc, loc_t, reduction="none").sum(-1) * pos
        ce = F.cross_entropy(conf.reshape(-1, conf.shape[-1]), cls_t.reshape(-1), reduction="none").view(pos.shape)
        with torch.no_grad():  # hard-negative mining: the 3 * num_pos negatives with the highest loss
            neg_loss = ce.detach().masked_fill(pos, 0)
            rank = neg_loss.argsort(1, descending=True).argsort(1)
            num_neg = (self.neg_pos_ratio * pos.sum(1, keepdim=True)).clamp(max=pos.shape[1] - 1)
            neg = rank < num_neg
        cls_l = ce * (pos | neg)
        if reduction == "none":
            return {"loc": loc_l.sum(1) / n, "cls": cls_l.sum(1) / n}
        return {"loc": loc_l.sum() / n, "cls": cls_l.sum() / n}

    def loss(self, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        loc, conf = self.raw(x)
        return self.multibox_loss(loc, conf, targets)

    def per_image_loss(self, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """One forward pass, then the multibox loss of each image slice as if it were its own batch (B,)."""
        if len(targets) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} images but {len(targets)} targets")
        loc, conf = self.raw(x)
        parts = [self.multibox_loss(loc[i:i + 1], conf[i:i + 1], [targets[i]]) for i in range(x.shape[0])]
        return {k: torch.stack([p[k].reshape(()) for p in parts]) for k in parts[0]}

    def positive_prior_losses(self, x: torch.Tensor, targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per prior CE(conf) + sum Smooth-L1(loc) on positive priors (0 elsewhere; negatives unused) (B, P),
        and the matched class of each prior (B, P), 0 = background."""
        loc, conf = self.raw(x)
        loc_t, cls_t = self.encode_targets(targets)
        pos = cls_t > 0
        ce = F.cross_entropy(conf.reshape(-1, conf.shape[-1]), cls_t.reshape(-1), reduction="none").view(pos.shape)
        return (ce + F.smooth_l1_loss(loc, loc_t, reduction="none").sum(-1)) * pos, cls_t

    def match_targets(self, targets: list[dict]) -> torch.Tensor:
        """(B, P) the class of every prior by SSD's own matching (IoU ``iou_threshold``), 0 = background."""
        return self.encode_targets(targets)[1]


def ssd_vgg16(*, num_classes: int = 20, input_size: int = 300) -> SSDVGG:
    """Full-size SSD300-VGG16 of ssd.pytorch (8732 priors at 300 px, VOC prior sizes)."""
    return SSDVGG(num_classes, input_size, width=1.0)


SHAPES_MIN_SIZES = (16, 40, 80, 128, 176, 224)
SHAPES_MAX_SIZES = (40, 80, 128, 176, 224, 272)


def ssd_vgg_small(*, num_classes: int, input_size: int = 256, width: float = 0.25) -> SSDVGG:
    """The zoo's small SSD-VGG: channel width x0.25, prior sizes for 10-200 px objects at 256 px."""
    f = input_size / 256.0
    return SSDVGG(num_classes, input_size, width=width, min_sizes=tuple(s * f for s in SHAPES_MIN_SIZES),
                  max_sizes=tuple(s * f for s in SHAPES_MAX_SIZES))
