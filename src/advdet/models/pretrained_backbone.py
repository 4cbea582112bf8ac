"""Backbones pretrained on the procedural classification set (:mod:`advdet.data.procedural`).

The pretraining stage under the zoo, as ImageNet is under real detectors: each zoo architecture's
backbone body is trained as a classifier (the body, global average pooling, one linear layer), and the
detectors of that architecture start from its body (``ZooEntry.backbone_init``), so families that share an
architecture share its pretrained weights:

- :func:`resnet_tiny_pretrain`: :class:`~advdet.models.tiny_backbone.TinyResNet` (the exact body of the
  zoo's RetinaNet, FCOS, Faster R-CNN and Mask R-CNN: their ``model.backbone.body``);
- :func:`vgg_tiny_pretrain`: the VGG16-style body of the zoo's ssd_vgg (its ``vgg`` trunk);
- :func:`darknet_tiny_pretrain`: the Darknet-53-style body of the zoo's yolov3 (its ``backbone``).

A :class:`BackboneClassifier` stores the body under ``body.`` and the head under ``fc.``; the zoo entry of
a detector names which of its own keys the body fills (``ZooEntry.backbone_keys``).
Input: float RGB (B, 3, S, S) in [0, 1], normalised inside as the detector of the same body normalises
(the ImageNet mean / std for the torchvision family, ``x * 255 - (104, 117, 123)`` for ssd_vgg, none for
yolov3), so the body sees the same statistics in pretraining and in detection. Output: (B, K) logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneClassifier(nn.Module):
    """``fc(mean_pool(body(normalise(x))))``; ``body`` maps (B, 3, S, S) to (B, C, h, w).

    ``work_size``: the body sees the input resized to ``work_size`` px (bilinear, antialiased) where it
    differs; None: as given. It lets a costly body pretrain at a lower resolution on the same data.

    ``loss(x, targets)``: cross-entropy (label smoothing ``label_smoothing``) against ``t["labels"][0]``
    of each target (the training loop's detection-style targets carry the class as a one-element label
    list) or ``t["label"]``.
    """

    family = "backbone"

    def __init__(self, body: nn.Module, out_channels: int, num_classes: int, input_size: int = 96,
                 label_smoothing: float = 0.1, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD, work_size: int | None = None):
        super().__init__()
        self.work_size = work_size
        self.body = body
        self.fc = nn.Linear(out_channels, num_classes)
        self.num_classes = num_classes
        self.input_size = input_size
        self.label_smoothing = label_smoothing
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.work_size is not None and x.shape[-2:] != (self.work_size, self.work_size):
            x = F.interpolate(x, size=(self.work_size, self.work_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return self.body((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"BackboneClassifier expects (B, 3, S, S) RGB in [0, 1], got {tuple(x.shape)}")
        return self.fc(self.features(x).mean((2, 3)))

    def loss(self, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        y = torch.stack([torch.as_tensor(t["label"] if "label" in t else t["labels"][0]).long()
                         for t in targets]).to(x.device)
        return {"cls": F.cross_entropy(self(x), y, label_smoothing=self.label_smoothing)}


def resnet_tiny_pretrain(*, num_classes: int, input_size: int = 96,
                         widths: tuple[int, int, int, int] = (16, 32, 64, 128),
                         blocks: tuple[int, int, int, int] = (1, 1, 1, 1)) -> BackboneClassifier:
    """The torchvision family's :class:`TinyResNet` body with a linear head (``body.`` = the detectors'
    ``model.backbone.body.``)."""
    from advdet.models.tiny_backbone import TinyResNet

    return BackboneClassifier(TinyResNet(widths, blocks), widths[-1], num_classes, input_size)


class _Sequence(nn.Module):
    """Runs the named child modules in order (the detector's own modules, so state-dict keys match)."""

    def __init__(self, **parts: nn.Module):
        super().__init__()
        for k, m in parts.items():
            setattr(self, k, m)
        self._order = list(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in self._order:
            m = getattr(self, k)
            if isinstance(m, nn.ModuleList):
                for layer in m:
                    x = layer(x)
            else:
                x = m(x)
        return x


def _last_conv_channels(m: nn.Module) -> int:
    return [c for c in m.modules() if isinstance(c, nn.Conv2d)][-1].out_channels


def vgg_tiny_pretrain(*, num_classes: int, input_size: int = 96, work_size: int | None = 64) -> BackboneClassifier:
    """The VGG16-style trunk of the zoo's ssd_vgg (conv1_1 .. conv7, no BN, width x0.25) with a linear head
    (``body.vgg.`` = the detector's ``model.vgg.``); ssd_vgg's input normalisation. The trunk costs ~9x the
    tiny ResNet per pixel, so by default it pretrains on the procedural images resized to 64 px
    (``work_size``; 0.5 s per update of 128 on one CPU thread instead of ~1.8 s at 96 px)."""
    from advdet.models.ssd_vgg import SSD_MEAN, build_vgg

    vgg = build_vgg(0.25)
    # He et al.'s init (torchvision's VGG: kaiming normal, fan_out): a 15-conv ReLU trunk without BN at
    # PyTorch's default init (variance x1/6 per layer) starts with vanishing activations and stays at
    # chance (a first run's loss was ln 256 after 1,850 updates)
    for m in vgg.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    mean = tuple(m / 255.0 for m in SSD_MEAN)
    return BackboneClassifier(_Sequence(vgg=vgg), _last_conv_channels(vgg), num_classes, input_size,
                              mean=mean, std=(1 / 255.0,) * 3, work_size=work_size)


def darknet_tiny_pretrain(*, num_classes: int, input_size: int = 96) -> BackboneClassifier:
    """The Darknet-53-style body of the zoo's yolov3 (stem and the five stages) with a linear head
    (``body.stem.`` / ``body.stages.`` = the detector's ``model.stem.`` / ``model.stages.``); no input
    normalisation, as yolov3."""
    from advdet.models.yolov3 import yolov3_small

    net = yolov3_small(num_classes=1, input_size=256).model
    body = _Sequence(stem=net.stem, stages=net.stages)
    return BackboneClassifier(body, _last_conv_channels(net.stages), num_classes, input_size,
                              mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
