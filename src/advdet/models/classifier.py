"""A small image classifier: the surrogate of RAD's classifier-transfer baselines (RAD Table 3).

On the shapes benchmark it is trained multi-label (which classes are present, binary cross-entropy per
class), and its top-1 class is its prediction: the clean top-1 is the label that PGD, SI-PGD, MI-DI-PGD
and MI-TI-PGD push away from (cross-entropy over its logits, as for an ImageNet classifier).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Block(nn.Module):
    """Two 3x3 conv-BN-ReLU layers with a residual connection (strided 1x1 shortcut when needed)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.short is None else self.short(x)))


class SmallClassifier(nn.Module):
    """ResNet-style classifier. Input (B, 3, S, S) float RGB in [0, 1] (normalised inside with the
    ImageNet mean/std); output (B, K) logits. ``widths`` set the four stages (strides 2, 2, 2, 2 after a
    stride-2 stem)."""

    family = "classifier"

    def __init__(self, num_classes: int, input_size: int = 256, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        self.num_classes = num_classes
        self.input_size = input_size
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for w in widths:
            layers.append(_Block(cin, w, 2))
            cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"SmallClassifier expects (B, 3, S, S) RGB in [0, 1], got {tuple(x.shape)}")
        y = self.layers(self.stem((x - self.mean) / self.std))
        return self.fc(y.mean((2, 3)))

    def loss(self, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Multi-label BCE: the target of class c is 1 when an object of class c is in the image."""
        present = torch.stack([presence_vector(t, self.num_classes) for t in targets]).to(x.device)
        return {"cls": F.binary_cross_entropy_with_logits(self(x), present)}


def presence_vector(target: dict, num_classes: int) -> torch.Tensor:
    """(K,) float: 1 for every class with at least one object in ``target``."""
    v = torch.zeros(num_classes)
    v[target["labels"].long()] = 1.0
    return v


def largest_object_label(target: dict) -> torch.Tensor:
    """The class label of an image for the classifier: explicit ``label``, else the largest box's label."""
    if "label" in target:
        return torch.as_tensor(target["label"], dtype=torch.long)
    b = target["boxes"]
    if len(b) == 0:
        raise ValueError("classifier target without boxes or label")
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return target["labels"][area.argmax()].long()


@torch.no_grad()
def classifier_accuracy(model: SmallClassifier, dataset, batch_size: int = 32, limit: int | None = None) -> dict:
    """``top1``: fraction of images whose top-1 class is present in the image; ``top1_largest``: fraction
    whose top-1 class is the class of the largest object."""
    from torch.utils.data import DataLoader, Subset

    from advdet.data.collate import collate_detection

    model.eval()
    ds = Subset(dataset, range(min(limit, len(dataset)))) if limit else dataset
    present = largest = total = 0
    for images, targets in DataLoader(ds, batch_size=batch_size, collate_fn=collate_detection):
        keep = [i for i, t in enumerate(targets) if len(t["boxes"])]
        pred = model(images[keep].to(next(model.parameters()).device)).argmax(1).cpu()
        for p, i in zip(pred.tolist(), keep):
            present += int(p in targets[i]["labels"].tolist())
            largest += int(p == int(largest_object_label(targets[i])))
        total += len(keep)
    return {"top1": present / max(1, total), "top1_largest": largest / max(1, total), "images": total}


def small_classifier(*, num_classes: int, input_size: int = 256) -> SmallClassifier:
    """The zoo's classifier (about 0.31M parameters)."""
    return SmallClassifier(num_classes, input_size)
