"""Model weights as safetensors plus a JSON model card; strict, clear-error loading."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from advdet.data.errors import AdvdetError
from advdet.data.io import atomic_write_json
from advdet.models.int8_storage import from_int8_storage, round_to_int8_storage, to_int8_storage


class CheckpointError(AdvdetError):
    """A weights file that does not fit the model (or cannot be read); the message names the file."""


def unsafe_pickle_error(path: str | os.PathLike) -> CheckpointError:
    """The one-line error for a pickle checkpoint that ``torch.load(weights_only=True)`` refuses: it
    names the file and how to convert it to safetensors (never advises ``weights_only=False`` here)."""
    p = Path(path)
    dst = p.with_suffix(".safetensors")
    return CheckpointError(
        f"{p}: refused to load: this pickle checkpoint holds objects other than tensors and could run code "
        f"when loaded. If you trust its source, convert it once to safetensors and pass that file: python -c "
        f"\"import torch; from safetensors.torch import save_file; sd = torch.load('{p}', weights_only=False); "
        f"sd = sd.get('state_dict', sd); save_file({{k: v.contiguous() for k, v in sd.items()}}, '{dst}')\"")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def round_to_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Round every floating parameter and buffer of ``model`` to ``dtype``'s precision, in place.

    The model keeps its own dtype; afterwards it computes exactly what it will compute once its weights
    are saved with ``save_weights(..., dtype=dtype)`` and loaded back, so a card measured after this
    call describes the stored file. ``torch.int8``: the int8 storage of :mod:`advdet.models.int8_storage`.
    """
    if dtype == torch.int8:
        return round_to_int8_storage(model)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.copy_(t.to(dtype))
    return model


def save_weights(model: nn.Module, path: str | os.PathLike, card: dict | None = None, *,
                 dtype: torch.dtype | None = None) -> dict:
    """Save ``model.state_dict()`` to ``path`` (.safetensors) and its card to the same name with .json.

    ``dtype`` (e.g. ``torch.float16``) stores floating tensors in that type (half the bytes); loading
    casts them back to the model's dtype. ``torch.int8`` stores conv and linear weights as int8 with
    per-channel scales and the rest in float16 (:mod:`advdet.models.int8_storage`, a quarter of the bytes).
    The card gets ``file_size``, ``sha256`` and ``dtype`` of the weights. Both files are written atomically.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if dtype == torch.int8:
        state = to_int8_storage(state)
    elif dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    card = dict(card or {})
    stored = sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()})
    card.update(file=path.name, file_size=path.stat().st_size, sha256=sha256_file(path),
                dtype="int8" if dtype == torch.int8 else ",".join(stored))
    atomic_write_json(path.with_suffix(".json"), card, indent=2)
    return card


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file (int8 storage is dequantized to float32), or a torch state dict with
    ``weights_only=True``; clear errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            return from_int8_storage(load_file(str(path)))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise unsafe_pickle_error(path) from None
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable or truncated weights file ({err})") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a state dict (got {type(obj).__name__})")
    return obj


def _fit_problems(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """The model keys missing from ``state`` and the shape mismatches (``"key: file (..) vs model (..)"``)."""
    missing = [k for k in own if k not in state]
    shape_bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    return missing, shape_bad


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load weights into ``model``, checking keys and shapes first.

    A checkpoint for another architecture or class count raises ``CheckpointError`` naming the file and
    the first mismatching keys and shapes.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    missing, shape_bad = _fit_problems(own, state)
    unexpected = [k for k in state if k not in own]
    problems = []
    if strict and missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    if shape_bad:
        problems.append(f"{len(shape_bad)} shape mismatches (e.g. {shape_bad[:3]})")
    if problems:
        raise CheckpointError(f"{path}: does not fit {type(model).__name__} (another architecture or class "
                              f"count?): " + "; ".join(problems))
    model.load_state_dict(state, strict=strict)
    return model


def load_weights_under(model: nn.Module, path: str | os.PathLike, prefix: str, src_prefix: str | None = None
                       ) -> list[str]:
    """Load only the tensors of ``path`` whose keys start with ``prefix`` (e.g. ``"model.backbone."``: a
    pretrained backbone). ``src_prefix``: the file stores them under this prefix instead (e.g. a pretrained
    classifier's ``"body."`` for a detector's ``"model.backbone.body."``). Every model key under ``prefix``
    must be in the file with the same shape, else ``CheckpointError`` names the file and the first
    problems. Returns the loaded (model) keys."""
    state = read_state_dict(path)
    if src_prefix is not None and src_prefix != prefix:
        state = {prefix + k[len(src_prefix):]: v for k, v in state.items() if k.startswith(src_prefix)}
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    if not own:
        raise CheckpointError(f"{path}: {type(model).__name__} has no parameters under {prefix!r}")
    missing, shape_bad = _fit_problems(own, state)
    if missing or shape_bad:
        raise CheckpointError(f"{path}: its {prefix!r} part does not fit {type(model).__name__}: "
                              f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(shape_bad)} shape "
                              f"mismatches (e.g. {shape_bad[:3]})")
    model.load_state_dict({k: state[k] for k in own}, strict=False)
    return list(own)


def read_card(path: str | os.PathLike) -> dict:
    p = Path(path).with_suffix(".json")
    return json.loads(p.read_text()) if p.is_file() else {}
