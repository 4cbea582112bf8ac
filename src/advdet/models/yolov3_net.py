"""The YOLOv3 network (Redmon & Farhadi, 2018): Darknet-53 backbone and three-scale head, as an ``nn.Module``
returning the raw detection maps (the Detector wrapper is :mod:`advdet.models.yolov3`).

The network registers its convolutions in the exact order of Darknet's ``yolov3.cfg`` (75 convs: the
52 of Darknet-53, then the stride-32 head with its detection conv, the route/1x1/upsample branch and
the stride-16 head, then the same for stride 8), so a real ``yolov3.weights`` file loads into
``yolov3(num_classes=80)`` with :func:`advdet.models.darknet_weights.load_darknet_weights`, and
``darknet53.conv.74`` (the ImageNet backbone) loads with ``num_convs=52``.

``width`` multiplies every channel count and ``depth`` every residual count (at least one block per
stage), so a small variant (``yolov3_small``) for the embedded ``shapes`` benchmark exists; the full
model is ``width = depth = 1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvBNLeaky", "Residual", "YoloBlock", "YOLOv3Net"]

_STAGE_CHANNELS = (64, 128, 256, 512, 1024)
_STAGE_BLOCKS = (1, 2, 8, 8, 4)


class ConvBNLeaky(nn.Module):
    """Darknet ``[convolutional]`` with ``batch_normalize=1``: conv (no bias), BN, LeakyReLU(0.1)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-5)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    """Darknet residual unit: 1x1 (c/2), 3x3 (c), ``[shortcut] from=-3`` (plain addition)."""

    def __init__(self, c: int, c_mid: int):
        super().__init__()
        self.conv1 = ConvBNLeaky(c, c_mid, 1)
        self.conv2 = ConvBNLeaky(c_mid, c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class YoloBlock(nn.Module):
    """One YOLOv3 head: five alternating 1x1/3x3 convs (``neck``, whose output feeds the route), a 3x3
    conv and the linear detection conv (``out``, with bias, no BN)."""

    def __init__(self, c_in: int, c_mid: int, c_out: int):
        super().__init__()
        c2 = 2 * c_mid
        self.neck = nn.Sequential(
            ConvBNLeaky(c_in, c_mid, 1), ConvBNLeaky(c_mid, c2, 3), ConvBNLeaky(c2, c_mid, 1),
            ConvBNLeaky(c_mid, c2, 3), ConvBNLeaky(c2, c_mid, 1))
        self.conv = ConvBNLeaky(c_mid, c2, 3)
        self.out = nn.Conv2d(c2, c_out, 1, bias=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        route = self.neck(x)
        return self.out(self.conv(route)), route


class YOLOv3Net(nn.Module):
    """Darknet-53 + YOLOv3 head; returns the raw detection maps, one per scale.

    Args:
        num_classes: K.
        width: channel multiplier (1.0 = Darknet-53); every channel count c becomes max(1, round(c*width)).
        depth: residual-count multiplier; stage counts (1, 2, 8, 8, 4) become max(1, round(n*depth)).
        num_anchors: anchors per scale (3 in YOLOv3).

    Input: (B, 3, H, W) with H and W multiples of 32 (YOLO takes [0, 1] RGB as it is).
    Output: list of three tensors in Darknet's order (strides 32, 16, 8), each
    (B, A*(5+K), H/s, W/s); channel a*(5+K)+c holds, for anchor a, c = 0..3 tx, ty, tw, th, 4 the
    objectness logit, 5.. the class logits.

    ``darknet_convs()`` lists (conv, bn-or-None) in yolov3.cfg order, which is also the registration
    order of the modules.
    """

    def __init__(self, num_classes: int = 80, width: float = 1.0, depth: float = 1.0, num_anchors: int = 3):
        super().__init__()
        if num_classes < 1 or width <= 0 or depth <= 0 or num_anchors < 1:
            raise ValueError(f"YOLOv3Net: bad arguments num_classes={num_classes} width={width} "
                             f"depth={depth} num_anchors={num_anchors}")
        self.num_classes, self.num_anchors, self.width, self.depth = num_classes, num_anchors, width, depth

        def ch(c: int) -> int:
            return max(1, int(round(c * width)))

        c_out = num_anchors * (5 + num_classes)
        # Backbone: stem, then per stage a stride-2 conv and its residual units.
        self.stem = ConvBNLeaky(3, ch(32), 3)
        stages = []
        c_prev = ch(32)
        for c, n in zip(_STAGE_CHANNELS, _STAGE_BLOCKS):
            blocks = [ConvBNLeaky(c_prev, ch(c), 3, stride=2)]
            blocks += [Residual(ch(c), ch(c // 2)) for _ in range(max(1, int(round(n * depth))))]
            stages.append(nn.Sequential(*blocks))
            c_prev = ch(c)
        self.stages = nn.ModuleList(stages)
        # Head, in cfg order: stride 32; route/1x1/upsample + stride 16; route/1x1/upsample + stride 8.
        self.head32 = YoloBlock(ch(1024), ch(512), c_out)
        self.lateral16 = ConvBNLeaky(ch(512), ch(256), 1)
        self.head16 = YoloBlock(ch(256) + ch(512), ch(256), c_out)
        self.lateral8 = ConvBNLeaky(ch(256), ch(128), 1)
        self.head8 = YoloBlock(ch(128) + ch(256), ch(128), c_out)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        a, k = self.num_anchors, self.num_classes
        for head in (self.head32, self.head16, self.head8):
            nn.init.normal_(head.out.weight, std=0.01)
            with torch.no_grad():
                bias = head.out.bias.view(a, 5 + k)
                bias.zero_()
                bias[:, 4] = math.log(0.01 / 0.99)  # objectness prior 0.01: stable start of training

    @property
    def num_backbone_convs(self) -> int:
        """Convs of the backbone (52 for Darknet-53: ``num_convs`` for ``darknet53.conv.74``)."""
        return 1 + sum(len(stage) * 2 - 1 for stage in self.stages)

    def darknet_convs(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
        """(conv, bn) pairs in yolov3.cfg order; bn is None for the three detection convs."""
        out: list[tuple[nn.Conv2d, nn.BatchNorm2d | None]] = []
        for m in self.modules():
            if isinstance(m, ConvBNLeaky):
                out.append((m.conv, m.bn))
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                out.append((m, None))
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"YOLOv3Net expects (B, 3, H, W) with H, W multiples of 32, got {tuple(x.shape)}")
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        c3, c4, c5 = feats[2], feats[3], feats[4]  # strides 8, 16, 32 (cfg layers 36, 61, 74)
        p32, r = self.head32(c5)
        r = F.interpolate(self.lateral16(r), scale_factor=2.0, mode="nearest")
        p16, r = self.head16(torch.cat([r, c4], 1))  # [route] layers = -1, 61
        r = F.interpolate(self.lateral8(r), scale_factor=2.0, mode="nearest")
        p8, _ = self.head8(torch.cat([r, c3], 1))  # [route] layers = -1, 36
        return [p32, p16, p8]
