"""A small ResNet-style backbone with a feature pyramid, built from torchvision pieces.

It lets the zoo's torchvision-family detectors (RetinaNet, FCOS, Faster R-CNN, Mask R-CNN, SSD) train in
minutes on a CPU at 256 px. The layout follows torchvision's ``resnet_fpn_backbone``:

- :class:`TinyResNet`: stem (two 3x3 stride-2 convs, stride 4) then four stages of ``BasicBlock``s with
  widths ``(16, 32, 64, 128)`` at strides 4, 8, 16, 32 (``layer1`` .. ``layer4``). Plain
  ``nn.BatchNorm2d`` everywhere (not frozen: the models are trained from scratch).
- :func:`tiny_resnet_fpn`: :class:`torchvision.models.detection.backbone_utils.BackboneWithFPN` on top of
  it, i.e. :class:`torchvision.ops.FeaturePyramidNetwork` with either

  * ``levels="p2p6"``: C2..C5 -> P2..P5 plus ``LastLevelMaxPool`` -> P6 (strides 4..64), keys
    ``"0", "1", "2", "3", "pool"``: the layout torchvision's Faster / Mask R-CNN expect;
  * ``levels="p3p7"``: C3..C5 -> P3..P5 plus ``LastLevelP6P7`` (from P5) -> P6, P7 (strides 8..128),
    keys ``"0", "1", "2", "p6", "p7"``: the layout of RetinaNet / FCOS.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

FPNLevels = Literal["p2p6", "p3p7"]

#: feature strides of each pyramid layout, in the order the FPN returns them
LEVEL_STRIDES: dict[str, tuple[int, ...]] = {"p2p6": (4, 8, 16, 32, 64), "p3p7": (8, 16, 32, 64, 128)}


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, identity (or 1x1 conv-BN projection) shortcut, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + idt)


class TinyResNet(nn.Module):
    """Small ResNet: ``stem`` (stride 4) then ``layer1`` .. ``layer4`` at strides 4, 8, 16, 32.

    Input (B, 3, H, W) normalised image; ``forward`` returns the ``layer4`` map (B, widths[3], H/32, W/32).
    Use it through :func:`tiny_resnet_fpn` (which taps ``layer1`` .. ``layer4``).
    """

    def __init__(self, widths: tuple[int, int, int, int] = (16, 32, 64, 128),
                 blocks: tuple[int, int, int, int] = (1, 1, 1, 1)):
        super().__init__()
        if len(widths) != 4 or len(blocks) != 4:
            raise ValueError(f"TinyResNet needs 4 widths and 4 block counts, got {widths}, {blocks}")
        w0 = widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(3, w0, 3, 2, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=True),
            nn.Conv2d(w0, w0, 3, 2, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=True),
        )
        in_ch = w0
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layers = [BasicBlock(in_ch, w, stride)] + [BasicBlock(w, w) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            in_ch = w
        self.widths = tuple(widths)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # zero-init the last BN of each residual branch (torchvision's zero_init_residual): stabler training
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x


def tiny_resnet_fpn(*, levels: FPNLevels = "p3p7", widths: tuple[int, int, int, int] = (16, 32, 64, 128),
                    blocks: tuple[int, int, int, int] = (1, 1, 1, 1), fpn_channels: int = 64) -> BackboneWithFPN:
    """Build a :class:`TinyResNet` + FPN backbone (torchvision's ``BackboneWithFPN``).

    Args (keyword-only):
        levels: ``"p3p7"`` (RetinaNet / FCOS / SSD: P3..P7, strides 8..128) or ``"p2p6"`` (Faster / Mask
            R-CNN: P2..P6, strides 4..64).
        widths: channels of ``layer1`` .. ``layer4``.
        blocks: number of ``BasicBlock``s per stage.
        fpn_channels: channels of every pyramid level (``backbone.out_channels``).

    Returns:
        a module mapping a normalised (B, 3, H, W) batch to an ``OrderedDict`` of 5 maps with
        ``fpn_channels`` channels each (keys as in the module docstring), with ``out_channels`` set.
    """
    body = TinyResNet(widths, blocks)
    if levels == "p2p6":
        return_layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
        in_list = list(widths)
        extra = LastLevelMaxPool()
    elif levels == "p3p7":
        return_layers = {"layer2": "0", "layer3": "1", "layer4": "2"}
        in_list = list(widths[1:])
        extra = LastLevelP6P7(fpn_channels, fpn_channels)
    else:
        raise ValueError(f"levels must be 'p2p6' or 'p3p7', got {levels!r}")
    return BackboneWithFPN(body, return_layers, in_list, fpn_channels, extra_blocks=extra)
