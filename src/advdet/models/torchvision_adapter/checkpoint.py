"""Local state-dict files for torchvision models: the project's one reader and fit check
(:func:`advdet.models.weights.read_state_dict`, :func:`~advdet.models.weights.check_fit`) with the torchvision
hooks around them: RetinaNet's v1 head keys upgraded as torchvision does, and FrozenBatchNorm layers detected
from the file."""

from __future__ import annotations

import os

import torch
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.ops import FrozenBatchNorm2d

from advdet.models.weights import CheckpointError, check_fit, match_prefixes, read_state_dict

#: what a torchvision file that does not fit most likely is (the hint of its fit error)
CLASS_LAYOUT_HINT = ("a checkpoint for another architecture, or for another number of classes: K+1 columns for "
                     "softmax families, K for RetinaNet/FCOS, 91 for torchvision's COCO models")

__all__ = ["CheckpointError", "load_state_dict_file"]


def _bn_saved_frozen(model: nn.Module, sd: dict) -> list[str]:
    """Names of the BatchNorm2d layers whose checkpoint entry has no ``num_batches_tracked``: they were saved
    from torchvision ``FrozenBatchNorm2d`` layers (torchvision's pretrained detectors)."""
    return [name for name, m in model.named_modules()
            if type(m) is nn.BatchNorm2d and f"{name}.running_mean" in sd and f"{name}.num_batches_tracked" not in sd]


def _freeze_bn(model: nn.Module, names: list[str], eps: float | None) -> None:
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        bn = getattr(parent, child_name)
        frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps if eps is None else eps).to(bn.running_mean.device)
        setattr(parent, child_name, frozen)


def load_state_dict_file(model: nn.Module, path: str | os.PathLike, *, strict: bool = True,
                         frozen_bn_eps: float | None = None) -> None:
    """Load a local weights file into ``model`` with a clear error on mismatch.

    The file is read by :func:`~advdet.models.weights.read_state_dict` (safetensors, or ``torch.load(...,
    weights_only=True)``; a torchvision-reference checkpoint ``{"model": state_dict, ...}`` is unwrapped) and
    ``module.`` / ``model.`` key prefixes are stripped (:func:`~advdet.models.weights.match_prefixes`).
    BatchNorm layers saved as torchvision ``FrozenBatchNorm2d`` (no ``num_batches_tracked``, as in
    torchvision's COCO files) become ``FrozenBatchNorm2d`` (eps ``frozen_bn_eps`` or the layer's own).
    torchvision's v1 RetinaNet head keys are upgraded as torchvision does. Raises :class:`CheckpointError`
    (the message of :func:`~advdet.models.weights.fit_error`, with :data:`CLASS_LAYOUT_HINT`) naming the file
    and the first shape mismatches and missing / unexpected keys; the model is left untouched then.
    """
    expected = model.state_dict()
    sd = match_prefixes(read_state_dict(path), expected)
    if isinstance(model, RetinaNet):
        from torchvision.models.detection.retinanet import _v1_to_v2_weights

        for prefix in ("head.classification_head.", "head.regression_head."):
            if f"{prefix}conv.0.0.weight" in expected and f"{prefix}conv.0.weight" in sd:
                _v1_to_v2_weights(sd, prefix)
    frozen = _bn_saved_frozen(model, sd)
    check_fit(model, sd, path, strict=strict, expected=expected,
              allow_missing={f"{n}.num_batches_tracked" for n in frozen}, hint=CLASS_LAYOUT_HINT)
    _freeze_bn(model, frozen, frozen_bn_eps)
    model.load_state_dict(sd, strict=strict)
