"""Local state-dict files for torchvision models: torch.load (weights only) or safetensors, checkpoint
wrappers and ``module.`` / ``model.`` prefixes, FrozenBatchNorm layers detected from the file, and one clear
:class:`CheckpointError` on mismatch."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.ops import FrozenBatchNorm2d

from advdet.models.weights import CheckpointError, unsafe_pickle_error  # the project's one checkpoint error

__all__ = ["CheckpointError", "load_state_dict_file"]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise unsafe_pickle_error(path) from None
    except Exception as e:  # noqa: BLE001 - any reader failure is reported with the file name
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict (expected a mapping of parameter names to tensors)")
    return dict(obj)


def _strip_prefix(sd: dict, expected: set[str]) -> dict:
    for prefix in ("module.", "model."):
        if sd and all(k.startswith(prefix) for k in sd) and not any(k.startswith(prefix) for k in expected):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


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

    The file is read with ``torch.load(..., weights_only=True)`` (or safetensors for ``.safetensors``); a
    torchvision-reference checkpoint ``{"model": state_dict, ...}`` and ``module.`` / ``model.`` key prefixes
    are accepted. BatchNorm layers saved as torchvision ``FrozenBatchNorm2d`` (no ``num_batches_tracked``,
    as in torchvision's COCO files) become ``FrozenBatchNorm2d`` (eps ``frozen_bn_eps`` or the layer's own).
    torchvision's v1 RetinaNet head keys are upgraded as torchvision does. Raises :class:`CheckpointError`
    naming the file and the first missing / unexpected keys and shape mismatches (another architecture or
    class count); the model is left untouched then.
    """
    path = Path(path)
    expected = model.state_dict()
    sd = _strip_prefix(_read_state_dict(path), set(expected))
    if isinstance(model, RetinaNet):
        from torchvision.models.detection.retinanet import _v1_to_v2_weights

        for prefix in ("head.classification_head.", "head.regression_head."):
            if f"{prefix}conv.0.0.weight" in expected and f"{prefix}conv.0.weight" in sd:
                _v1_to_v2_weights(sd, prefix)
    frozen = _bn_saved_frozen(model, sd)
    dropped = {f"{n}.num_batches_tracked" for n in frozen}
    missing = [k for k in expected if k not in sd and k not in dropped]
    unexpected = [k for k in sd if k not in expected]
    shapes = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es), first: " + "; ".join(
            f"{k}: file {s} vs model {e}" for k, s, e in shapes[:5]))
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s), first: {missing[:5]}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), first: {unexpected[:5]}")
    if problems:
        hint = (" (a checkpoint for another architecture, or for another number of classes: K+1 columns for "
                "softmax families, K for RetinaNet/FCOS, 91 for torchvision's COCO models)")
        raise CheckpointError(f"{path}: does not fit {type(model).__name__}: " + " | ".join(problems) + hint)
    _freeze_bn(model, frozen, frozen_bn_eps)
    model.load_state_dict(sd, strict=strict)
