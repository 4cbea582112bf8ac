"""Adversarial Image Discriminator (RobustDet's AID, paper Sec. 4.3, ALGORITHMS.md 1.2).

The AID maps the detector's own normalised input (``x * 255 - mean``, no ImageNet normalisation) to a
K-way probability vector ``pi`` per image with a plain softmax (no temperature); ``pi`` mixes the K
kernels of every :class:`~advdet.models.dynamic_conv.DynamicConv2d`. It is fully differentiable and lives
inside the detector's graph, so attacks on a RobustDet model are adaptive (they also move ``pi``).

- :func:`aid_resnet18`: the reference discriminator, torchvision ResNet-18 with ``fc = Linear(512, K)``;
  built with ``weights=None`` (the reference starts from ImageNet weights, which cannot be downloaded here).
- :func:`aid_small`: the zoo default, a 4-stage tiny ResNet (:class:`~advdet.models.tiny_backbone.TinyResNet`,
  widths (8, 16, 32, 64), one BasicBlock per stage, stride 32), global average pool, ``Linear(64, K)``.
"""

from __future__ import annotations

import torch
from torch import nn

from advdet.models.tiny_backbone import TinyResNet


class AID(nn.Module):
    """``forward(x_normalised) -> pi`` (B, K), softmax of ``logits(x)``.

    Args:
        backbone: module mapping (B, 3, H, W) to logits (B, K).
        K: number of kernels (outputs).
    """

    def __init__(self, backbone: nn.Module, K: int):
        super().__init__()
        self.backbone = backbone
        self.K = K

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        z = self.backbone(x)
        if z.ndim != 2 or z.shape[1] != self.K:
            raise ValueError(f"AID backbone must output (B, {self.K}) logits, got {tuple(z.shape)}")
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).softmax(-1)


def aid_cross_entropy(pi: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``mean_i -log pi_i[labels_i]``: cross-entropy of the AID's softmax ``pi`` (N, K) against kernel indices."""
    return torch.nn.functional.nll_loss(pi.clamp_min(torch.finfo(pi.dtype).tiny).log(), labels.to(pi.device))


def aid_resnet18(K: int = 4) -> AID:
    """The reference AID: torchvision ResNet-18 (``weights=None``), fc -> Linear(512, K), plain softmax."""
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    net.fc = nn.Linear(512, K)
    return AID(net, K)


class _TinyClassifier(nn.Module):
    def __init__(self, K: int, widths: tuple[int, int, int, int]):
        super().__init__()
        self.body = TinyResNet(widths, (1, 1, 1, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.body(x)).flatten(1))


def aid_small(K: int = 4, widths: tuple[int, int, int, int] = (8, 16, 32, 64)) -> AID:
    """The zoo's small AID: a 4-stage tiny ResNet (BN, stride 32), average pool, Linear(widths[-1], K)."""
    return AID(_TinyClassifier(K, widths), K)


def build_aid(kind: str | nn.Module, K: int) -> nn.Module:
    """``"small"`` -> :func:`aid_small`, ``"resnet18"`` -> :func:`aid_resnet18`, a module is used as is."""
    if isinstance(kind, nn.Module):
        return kind
    if kind == "small":
        return aid_small(K)
    if kind == "resnet18":
        return aid_resnet18(K)
    raise ValueError(f"unknown AID {kind!r}; use 'small', 'resnet18' or an nn.Module")
