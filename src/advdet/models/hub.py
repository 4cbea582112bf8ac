"""The model hub: one registry of every model family, :func:`get_model` to build a model by name,
:func:`list_models` to see them, and :func:`provenance` to say which weights a model carries.

Each family registers its builder where it is defined, with :func:`register_model` (as torchvision's
``@register_model``), under a name prefix:

- ``""`` (bare names, :mod:`advdet.models.zoo`): the zoo (``ssd_vgg``, ``yolov3``, ...) with its shipped
  weights from ``advdet/zoo_weights/NAME.safetensors`` (``pretrained=True``);
- ``torchvision:`` (:mod:`advdet.models.torchvision_adapter.builders`): torchvision's detection builders
  and the tiny ones (``torchvision:retinanet_tiny``), random or with ``weights=PATH``;
- ``darknet:`` (:mod:`advdet.models.yolov3`): the published YOLOv3, random, with a Darknet ``.weights``
  file or an advdet safetensors file;
- ``ultralytics:`` (:mod:`advdet.models.ultralytics_adapter`, extra ``advdet[ultralytics]``) and ``hf:``
  (:mod:`advdet.models.hf_rtdetr`, extra ``advdet[hf]``): listed only where the extra is importable; built
  without it, they raise the one-line error that names the extra.

Every prefixed family is *external* (:func:`is_external`): no shipped weights, any input size.
Weights are read by the one reader and checked by the one fit check of :mod:`advdet.models.weights`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Literal

import torch
from torch import nn

__all__ = ["ModelFamily", "ModelInfo", "Provenance", "register_model", "get_model", "to_channels_last",
           "list_models", "model_family", "is_external", "provenance"]

#: ``build(arch, *, weights, pretrained, num_classes, input_size) -> nn.Module`` of a family
Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelInfo:
    """One buildable name, as :func:`list_models` lists it."""

    name: str
    family: str            # zoo family (ssd_vgg, yolov3, ...) or the prefix family (torchvision, tiny, ...)
    kind: str              # detector | classifier | backbone
    trained: bool          # shipped weights present (zoo); prefixed names never have any
    external: bool
    description: str = ""


@dataclass(frozen=True)
class ModelFamily:
    """A registered builder: the names it answers (``prefix`` + arch), how to list them, and, for names that
    carry their own weights file (``ultralytics:best.pt``), which file that is."""

    prefix: str
    family: str
    build: Builder
    names: Callable[[], Iterable[ModelInfo]]
    weights_in_name: Callable[[str], Path | None] | None = None

    @property
    def external(self) -> bool:
        return self.prefix != ""


_FAMILIES: dict[str, ModelFamily] = {}
#: the modules whose import registers a family (each registers where its builder is defined)
_FAMILY_MODULES = ("advdet.models.zoo", "advdet.models.torchvision_adapter.builders", "advdet.models.yolov3",
                   "advdet.models.ultralytics_adapter", "advdet.models.hf_rtdetr")


def register_model(prefix: str, *, family: str, names: Callable[[], Iterable[ModelInfo]] = tuple,
                   weights_in_name: Callable[[str], Path | None] | None = None) -> Callable[[Builder], Builder]:
    """Decorator: register ``build`` as the builder of every name ``prefix + ARCH`` (``prefix=""``: the
    zoo's bare names). ``names()`` lists the family's names for :func:`list_models` (only those that can be
    built here: an extra's names only where it is installed)."""
    if prefix and not prefix.endswith(":"):
        raise ValueError(f"a model prefix ends with ':', got {prefix!r}")

    def deco(build: Builder) -> Builder:
        old = _FAMILIES.get(prefix)
        if old is not None and (old.build.__module__, old.build.__qualname__) != (build.__module__,
                                                                                 build.__qualname__):
            raise ValueError(f"model prefix {prefix!r} registered twice ({old.build.__qualname__}, "
                             f"{build.__qualname__})")
        _FAMILIES[prefix] = ModelFamily(prefix, family, build, names, weights_in_name)
        return build
    return deco


def _families() -> dict[str, ModelFamily]:
    """The registry, every family module imported (each registers itself on import)."""
    import importlib

    for mod in _FAMILY_MODULES:
        importlib.import_module(mod)  # a no-op once imported
    return _FAMILIES


def model_family(name: str) -> tuple[ModelFamily, str]:
    """(the family that builds ``name``, the name without its prefix); bare names are the zoo's."""
    fams = _families()
    prefix = name.split(":", 1)[0] + ":" if ":" in name else ""
    fam = fams.get(prefix, fams[""])
    return fam, name[len(fam.prefix):]


def is_external(name: str) -> bool:
    """True for prefixed names (``torchvision:BUILDER``, ``darknet:yolov3``, ``ultralytics:``, ``hf:``):
    no shipped weights, any input size."""
    return model_family(name)[0].external


def get_model(name: str, *, weights: str | os.PathLike | None = None, input_size: int | None = None,
              num_classes: int | None = None, pretrained: bool = True, channels_last: bool = True) -> nn.Module:
    """Build the model ``name`` (see the module docstring) in eval mode.

    ``channels_last``: store the 4-D weights channels-last (NHWC), so that the convolutions run in that
    layout; the outputs are the same up to float rounding. On the CPU (oneDNN) it made one PGD+SI iteration
    27-41 % and one RAD iteration 2-10 % cheaper on the zoo's yolov3 and ssd_vgg
    (``benchmarks/bench_rad.py --channels-last`` against ``--no-channels-last``, docs/rad.md "Cost").

    ``weights``: a local file that overrides the shipped weights (zoo) or loads into the built model
    (external names). ``pretrained=False``: a zoo model with random weights. ``input_size`` and
    ``num_classes`` shape external models; a zoo model is fixed (a different value is a ``ValueError``).
    Raises ``CheckpointError`` for weights that do not fit, are missing or unsafe (and for a zoo model whose
    shipped weights do not exist yet, unless ``pretrained=False``); ``KeyError`` for an unknown name.
    """
    fam, arch = model_family(name)
    model = fam.build(arch, weights=weights, pretrained=pretrained, num_classes=num_classes, input_size=input_size)
    if not fam.external:
        for what, asked in (("input_size", input_size), ("num_classes", num_classes)):
            if asked is not None and getattr(model, what, asked) != asked:
                raise ValueError(f"zoo model {name!r} has {what}={getattr(model, what)}, not {asked}; only "
                                 f"prefixed models (torchvision:, darknet:, ...) take {what}")
    if channels_last:
        to_channels_last(model)
    return model.eval()


def to_channels_last(model: nn.Module) -> nn.Module:
    """``model`` with every 4-D parameter and buffer moved in place to channels-last (``Module.to(memory_format=
    ...)`` refuses a module with 5-D ones, as RobustDet's dynamic convolutions have: those stay as they are)."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.dim() == 4:
                t.data = t.data.contiguous(memory_format=torch.channels_last)
    return model


def list_models(family: str | None = None) -> list[ModelInfo]:
    """Every name this install can build: the zoo's entries, then each prefixed family's builders
    (``torchvision:...``, ``darknet:yolov3``, and the extras' names where installed). ``family``: only the
    names of that family or prefix family (``"zoo"`` for the zoo's entries)."""
    out = []
    prefixes = ["", "torchvision:", "darknet:", "ultralytics:", "hf:"]
    for fam in sorted(_families().values(), key=lambda f: prefixes.index(f.prefix) if f.prefix in prefixes else 9):
        for info in fam.names():
            if family is None or family in (info.family, fam.family):
                out.append(info)
    return out


@dataclass(frozen=True)
class Provenance:
    """Which weights a model carries: ``origin`` is ``"zoo"`` (the shipped file), ``"file"`` (a file given),
    ``"untrained"`` (random) or ``"given"`` (a module passed in, not built here); ``file`` and its ``sha256``
    for the first two."""

    origin: Literal["zoo", "file", "untrained", "given"]
    file: str | None = None
    sha256: str | None = None

    def as_dict(self) -> dict:
        """``{"file", "sha256", "origin"}``, the record results and pages carry."""
        return {"file": self.file, "sha256": self.sha256, "origin": self.origin}


@lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    from advdet.models.weights import sha256_file

    return sha256_file(path)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, computed once per (path, size, mtime)."""
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def provenance(name: str, *, weights: str | os.PathLike | None = None, pretrained: bool = True,
               given: bool = False) -> Provenance:
    """The one provenance record of the model that ``get_model(name, weights=weights, pretrained=pretrained)``
    builds (``given``: a module passed in under ``name``). Computed before or after building; a file that
    does not exist (yet) gives no sha256."""
    if given:
        return Provenance("given")
    fam, arch = model_family(name)
    if weights is not None:
        path, origin = Path(weights), "file"
    elif not fam.external:
        from advdet.models.zoo import zoo_entry

        path, origin = (zoo_entry(arch).weights_path if pretrained else None), "zoo"
        if path is not None and not path.is_file():
            path = None
    else:
        path, origin = (fam.weights_in_name(arch) if fam.weights_in_name else None), "file"
    if path is None:
        return Provenance("untrained")
    return Provenance(origin, str(path), file_sha256(path) if path.is_file() else None)  # type: ignore[arg-type]
