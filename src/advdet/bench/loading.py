"""Load a benchmark model by name (any name of :func:`advdet.models.hub.get_model`), with its weights, in
eval mode, and its provenance (:func:`advdet.models.hub.provenance`: file, sha256, origin).

One loader for every benchmark (transfer, robustness, analyses), and the one place that decides
"untrained": a model without trained weights is refused with ``UntrainedModelError`` unless the caller
allows random weights explicitly (``allow_untrained``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from advdet.data.errors import AdvdetError
from advdet.models.hub import Provenance, get_model, is_external, provenance
from advdet.models.zoo import zoo_entry

log = logging.getLogger(__name__)

__all__ = ["LoadedModel", "LoadedEnsemble", "UntrainedModelError", "load_model", "load_detector", "load_ensemble"]

_HOW = ("pass a weights file (Python weights=PATH, CLI --weights NAME=PATH) or allow random weights "
        "explicitly (allow_untrained=True, CLI --allow-untrained)")


class UntrainedModelError(AdvdetError):
    """A model without trained weights was asked for; the message says how to give or allow it."""


@dataclass
class LoadedModel:
    name: str
    model: nn.Module
    kind: str               # "detector" | "classifier"
    input_size: int
    has_masks: bool
    trained: bool
    weights: str | None     # the weights file it was loaded from (None: random, or the zoo's shipped file)
    #: which weights it carries (:func:`advdet.models.hub.provenance`); None: computed from the fields above
    provenance: Provenance | None = None

    def info(self) -> dict:
        """Kind, input size, masks, and which weights: ``weights`` (a given file or None) and
        ``weights_sha256`` (of the file actually loaded, the zoo's shipped one included; None when
        random or given as a module), so a result names the exact weights it measured."""
        return {"kind": self.kind, "input_size": self.input_size, "has_masks": self.has_masks,
                "trained": self.trained, "weights": self.weights, "weights_sha256": self.weights_sha256}

    def _provenance(self) -> Provenance:
        if self.provenance is None:
            try:
                self.provenance = provenance(self.name, weights=self.weights, pretrained=self.trained,
                                             given=self.trained and self.weights is None and is_external(self.name))
            except KeyError:  # not a hub name: a module built elsewhere
                self.provenance = Provenance("given")
        return self.provenance

    @property
    def weights_sha256(self) -> str | None:
        return self._provenance().sha256

    @property
    def origin(self) -> str:
        """Where the weights came from: the file (given or the zoo's), ``"untrained"``, or ``"given"`` (a
        module passed in)."""
        p = self._provenance()
        return p.file if p.origin in ("zoo", "file") and p.file else p.origin


@dataclass
class LoadedEnsemble(LoadedModel):
    """An ``a+b+c`` surrogate: ``model`` is the members' ``SurrogateEnsemble``; ``members`` the loaded
    members, whose weights (sha256) ``info()`` lists under ``members``."""

    members: list[LoadedModel] = field(default_factory=list)

    @property
    def origin(self) -> str:
        return "ensemble"

    @property
    def weights_sha256(self) -> str | None:
        return None

    def info(self) -> dict:
        return {**super().info(), "members": {m.name: m.info() for m in self.members}}


def load_ensemble(name: str, load_member: Callable[[str], LoadedModel | None]) -> LoadedEnsemble | None:
    """The ensemble surrogate ``a+b+c`` from its members, each loaded by ``load_member(name)`` (e.g.
    :func:`load_model` with the caller's weights and device; a ``None`` member gives ``None``). An unknown
    member raises ``UnknownNameError`` naming it and the ensemble; a classifier member or members of
    different input sizes raise ``EnsembleError`` (one line)."""
    from advdet.attacks.ensemble import EnsembleError, SurrogateEnsemble, parse_ensemble
    from advdet.data.errors import UnknownNameError

    names = parse_ensemble(name)
    members: list[LoadedModel] = []
    for m in names:
        try:
            lm = load_member(m)
        except UnknownNameError as err:
            raise UnknownNameError(f"ensemble {name!r}: unknown member {m!r} ({err})") from None
        except KeyError as err:
            msg = err.args[0] if err.args else m
            raise UnknownNameError(f"ensemble {name!r}: unknown member {m!r} ({msg})") from None
        if lm is None:
            return None
        if lm.kind != "detector":
            raise EnsembleError(f"ensemble {name!r}: member {m!r} is a {lm.kind}, not a detector")
        members.append(lm)
    ens = SurrogateEnsemble([lm.model for lm in members], names)
    return LoadedEnsemble(name, ens, "detector", int(ens.input_size), False, all(lm.trained for lm in members),
                          None, members=members)


def load_model(name: str, *, weights: str | os.PathLike | None = None, allow_untrained: bool = False,
               device: torch.device | str | None = None, model: nn.Module | None = None,
               input_size: int | None = None) -> LoadedModel:
    """Build a zoo / ``torchvision:`` model for a benchmark, in eval mode on ``device``.

    ``weights`` (a file) overrides the zoo's shipped weights. A zoo model without shipped weights (or a
    torchvision model without ``weights``) raises ``UntrainedModelError`` unless ``allow_untrained`` (then
    it is randomly initialised and marked ``trained=False``); a shipped file that cannot be read raises
    ``CheckpointError``. ``model``: use this already built module under ``name`` (tests, custom models).
    ``input_size``: letterbox size of a ``torchvision:`` model (default: the builder's; zoo models are
    fixed at 256).
    """
    from advdet.models.detector import Detector

    if model is None:
        prov = provenance(name, weights=weights)  # KeyError for an unknown zoo name
        trained = prov.origin != "untrained"
        if not trained and not allow_untrained:
            if is_external(name):
                raise UntrainedModelError(f"{name} has no trained weights (a {name.split(':', 1)[0]} builder "
                                          f"without a weights file is randomly initialised); {_HOW}")
            raise UntrainedModelError(f"zoo model {name!r} has no trained weights ({zoo_entry(name).weights_path} "
                                      f"is missing; train them with `advdet zoo train {name}`); {_HOW}")
        if input_size is not None and not is_external(name):
            raise ValueError(f"model {name!r}: only torchvision: models take an input size (zoo models: 256)")
        model = get_model(name, weights=weights, pretrained=trained, input_size=input_size)
        if not trained:
            log.warning("model %s is randomly initialised (no trained weights)", name)
    else:
        trained = True
        prov = provenance(name, weights=weights, given=weights is None)
    model.eval()
    if device is not None:
        model.to(device)
    kind = "detector" if isinstance(model, Detector) else "classifier"
    size = int(getattr(model, "input_size", 0) or 0)
    if size <= 0:
        raise ValueError(f"model {name!r} has no input_size attribute")
    return LoadedModel(name, model, kind, size, bool(getattr(model, "has_masks", False)), trained,
                       None if weights is None else str(weights), prov)


def load_detector(name: str, *, weights: str | os.PathLike | None = None,
                  allow_untrained: bool = False) -> tuple[nn.Module, str]:
    """:func:`load_model` for benchmarks that need a detector: (detector in eval mode, origin), with
    origin the weights path or ``"untrained"``; a zoo classifier is refused with ``ValueError``."""
    if not is_external(name):
        entry = zoo_entry(name)
        if entry.kind != "detector":
            raise ValueError(f"{name!r} is a zoo {entry.kind}, not a detector; this benchmark needs detectors")
    loaded = load_model(name, weights=weights, allow_untrained=allow_untrained)
    if loaded.kind != "detector":
        raise TypeError(f"{name}: built a {type(loaded.model).__name__}, not a Detector")
    return loaded.model, loaded.origin
