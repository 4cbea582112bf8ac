"""Model weights as safetensors plus a JSON model card; strict, clear-error loading.

The one reader (:func:`read_state_dict`) and the one fit check (:func:`check_fit`, message
:func:`fit_error`) of every model family: zoo models, torchvision's (their FrozenBatchNorm and RetinaNet
v1 hooks live in ``torchvision_adapter.checkpoint``), Darknet YOLOv3's safetensors, ultralytics and RT-DETR.
Which model a name builds and where its weights came from: :mod:`advdet.models.hub`."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Iterable

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
        f"sd = sd.get('state_dict', sd); "
        f"save_file({{k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}}, '{dst}')\"")


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


#: wrappers a checkpoint may hold its state dict under (torchvision's references, Lightning-style, trainers)
STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")
#: key prefixes stripped when every key of a file has one and no key of the model does: ``module.`` (saved from
#: DistributedDataParallel / DataParallel), ``model.`` (saved from a wrapper around the model it is loaded into)
STRIPPED_PREFIXES = ("module.", "model.")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The one state-dict reader of every model family.

    A ``.safetensors`` file (int8 storage is dequantized to float32) or a torch file read with
    ``torch.load(weights_only=True)``; a checkpoint ``{"model" | "state_dict" | "model_state_dict": ...}`` is
    unwrapped. A pickle that needs more than tensors is refused (:func:`unsafe_pickle_error`); every error is a
    :class:`CheckpointError` naming the file. Key prefixes are matched to a model by :func:`match_prefixes`.
    """
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
    for _ in range(2):  # {"model": {"state_dict": ...}} at most
        inner = next((obj[k] for k in STATE_DICT_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)),
                     None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        got = type(obj).__name__ if not isinstance(obj, dict) else "a mapping with non-tensor values"
        raise CheckpointError(f"{path}: not a state dict (expected a mapping of parameter names to tensors, "
                              f"got {got})")
    return dict(obj)


def match_prefixes(state: dict[str, torch.Tensor], expected: Iterable[str]) -> dict[str, torch.Tensor]:
    """``state`` with the :data:`STRIPPED_PREFIXES` removed where every key of ``state`` has the prefix and no
    key of ``expected`` (the model's) has it: a DDP ``module.`` or a wrapper's ``model.``, for every family."""
    expected = list(expected)
    for prefix in STRIPPED_PREFIXES:
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def fit_problems(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], *, strict: bool = True,
                 allow_missing: Iterable[str] = (), allow_unexpected: bool = False) -> list[str]:
    """What keeps ``state`` from loading into a model whose state dict is ``expected``: shape mismatches
    (``"key: file (..) vs model (..)"``), then missing and unexpected keys (with ``strict``), each as
    ``"N <problem> (e.g. [first three])"``; empty when it fits. ``allow_missing``: model keys the caller
    fills otherwise (e.g. ``num_batches_tracked`` of layers that become FrozenBatchNorm)."""
    allowed = set(allow_missing)
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    missing = [k for k in expected if k not in state and k not in allowed] if strict else []
    unexpected = [k for k in state if k not in expected] if strict and not allow_unexpected else []
    return [f"{len(items)} {what} (e.g. {items[:3]})" for what, items in
            (("shape mismatches", shapes), ("missing keys", missing), ("unexpected keys", unexpected)) if items]


def fit_error(path: str | os.PathLike, model: nn.Module | str, problems: list[str], *, part: str | None = None,
              hint: str = "another architecture or class count?") -> CheckpointError:
    """The one message of a weights file that does not fit: ``PATH: [its 'PART' part ]does not fit MODEL:
    PROBLEMS (HINT)``."""
    name = model if isinstance(model, str) else type(model).__name__
    where = f"its {part!r} part " if part else ""
    return CheckpointError(f"{path}: {where}does not fit {name}: " + "; ".join(problems) + f" ({hint})")


def check_fit(model: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike, *, strict: bool = True,
              expected: dict[str, torch.Tensor] | None = None, allow_missing: Iterable[str] = (),
              allow_unexpected: bool = False, part: str | None = None, hint: str | None = None) -> None:
    """Raise :func:`fit_error` when ``state`` (read from ``path``) does not fit ``model`` (its state dict, or
    ``expected``): the one key / shape check of every loader."""
    problems = fit_problems(model.state_dict() if expected is None else expected, state, strict=strict,
                            allow_missing=allow_missing, allow_unexpected=allow_unexpected)
    if problems:
        raise fit_error(path, model, problems, part=part, **({} if hint is None else {"hint": hint}))


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load weights into ``model``, checking keys and shapes first (:func:`check_fit`).

    The file is read by :func:`read_state_dict`, its prefixes matched by :func:`match_prefixes` (a DDP
    ``module.`` file loads). A checkpoint for another architecture or class count raises ``CheckpointError``
    naming the file and the first mismatching keys and shapes; the model is left untouched then.
    """
    own = model.state_dict()
    state = match_prefixes(read_state_dict(path), own)
    check_fit(model, state, path, strict=strict, expected=own)
    model.load_state_dict(state, strict=strict)
    return model


def load_weights_under(model: nn.Module, path: str | os.PathLike, prefix: str, src_prefix: str | None = None
                       ) -> list[str]:
    """Load only the tensors of ``path`` whose keys start with ``prefix`` (e.g. ``"model.backbone."``: a
    pretrained backbone). ``src_prefix``: the file stores them under this prefix instead (e.g. a pretrained
    classifier's ``"body."`` for a detector's ``"model.backbone.body."``). Every model key under ``prefix``
    must be in the file with the same shape, else ``CheckpointError`` (:func:`fit_error`) names the file and
    the first problems. Returns the loaded (model) keys."""
    state = read_state_dict(path)
    state = match_prefixes(state, [src_prefix] if src_prefix is not None else model.state_dict())  # DDP module.
    if src_prefix is not None and src_prefix != prefix:
        state = {prefix + k[len(src_prefix):]: v for k, v in state.items() if k.startswith(src_prefix)}
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    if not own:
        raise CheckpointError(f"{path}: {type(model).__name__} has no parameters under {prefix!r}")
    check_fit(model, state, path, expected=own, allow_unexpected=True, part=prefix)
    model.load_state_dict({k: state[k] for k in own}, strict=False)
    return list(own)


def read_card(path: str | os.PathLike) -> dict:
    p = Path(path).with_suffix(".json")
    return json.loads(p.read_text()) if p.is_file() else {}
