"""The crafting pipeline the benchmarks share: models by name, data per input size, a crafter per attack.

- :class:`ModelSet`: the run's models loaded once by name (``a+b`` ensembles from their members), with a
  note in ``skipped`` for a model that cannot be loaded when the run skips those;
- :class:`DatasetsBySize`: the one per-size dataset cache of ``bench transfer``, ``bench robustness``, the
  analyses and the relevance similarity, read in batches of :func:`index_batches`: every model reads the
  same images, in the same order, letterboxed to its own input size, and each size is read once;
- :class:`Crafter`: one attack under the seed policy of :mod:`advdet.attacks.seeding` (the batch whose
  first image has index ``i`` is crafted after ``seed_batch(attack, seed, i)``); ``Crafter.batches``
  yields a :class:`CraftedBatch` per batch of a dataset: the clean images, the adversarial ones
  (quantised to the uint8 a PNG would hold with ``quantize_adv``, or float with ``quantize=False``),
  the letterbox parameters, the perturbation statistics and the attack's diagnostics.

``bench transfer`` crafts with all three (and :class:`advdet.bench.transfer_victims.VictimSet`);
``advdet attack`` / ``dataset`` craft each batch of their resumable job with ``Crafter.craft``;
``bench robustness`` and the analyses craft white box (ground truth, no mask) with ``Crafter.craft`` and
evaluate the float images, unquantised, as RobustDet's evaluation does.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from advdet.attacks.batches import letterbox_mask
from advdet.attacks.ensemble import is_ensemble_name
from advdet.attacks.quantize import quantize_adv, to_uint8
from advdet.attacks.seeding import seed_batch
from advdet.bench.loading import LoadedModel, UntrainedModelError, load_ensemble, load_model
from advdet.data.collate import collate_detection
from advdet.metrics.perturbation import perturbation_stats

__all__ = ["ModelSet", "DatasetsBySize", "index_batches", "Crafter", "CraftedBatch", "gt_targets"]


class ModelSet:
    """The models of a run, each loaded once by name (:func:`advdet.bench.loading.load_model`, on
    ``device``); ``a+b+c`` is the ensemble of its members (:func:`advdet.bench.loading.load_ensemble`).

    ``weights``, ``models`` and ``sizes``: per name a weights file, an already built module, a letterbox
    size (``torchvision:`` models). A model without weights raises ``UntrainedModelError`` unless
    ``allow_untrained``; with ``skip_unavailable`` it is left out instead (``get`` returns None) and a
    note goes to ``skipped``."""

    def __init__(self, *, device, weights: Mapping[str, str] | None = None,
                 models: Mapping[str, nn.Module] | None = None, sizes: Mapping[str, int] | None = None,
                 allow_untrained: bool = False, skip_unavailable: bool = False,
                 skipped: list[str] | None = None) -> None:
        self.device, self.allow_untrained, self.skip_unavailable = device, allow_untrained, skip_unavailable
        self.weights, self.models, self.sizes = dict(weights or {}), dict(models or {}), dict(sizes or {})
        self.skipped = skipped if skipped is not None else []
        self.loaded: dict[str, LoadedModel] = {}

    def get(self, name: str) -> LoadedModel | None:
        """The loaded model ``name`` (None when unavailable and skipped)."""
        if name in self.loaded:
            return self.loaded[name]
        if is_ensemble_name(name):
            lm = load_ensemble(name, self.get)
            if lm is None:
                self.skipped.append(f"ensemble {name}: a member is unavailable")
                return None
            self.loaded[name] = lm
            return lm
        try:
            lm = load_model(name, weights=self.weights.get(name), allow_untrained=self.allow_untrained,
                            device=self.device, model=self.models.get(name), input_size=self.sizes.get(name))
        except UntrainedModelError as err:
            if not self.skip_unavailable:
                raise
            self.skipped.append(f"model {name}: {err}")
            return None
        self.loaded[name] = lm
        return lm

    def __getitem__(self, name: str) -> LoadedModel:
        return self.loaded[name]


class DatasetsBySize:
    """One letterboxed copy of ``data`` per input size, built on first use (``ds[size]``), the same images
    in the same order at every size.

    Two readers, as the benchmarks need them:

    - ``masks=False`` (robustness, analyses, relevance similarity): boxes only, through
      :func:`advdet.bench.robustness_scoring.load_eval_dataset` (a Pascal VOC folder as
      ``VOCDetection(split=voc_split)``, anything else as COCO format);
    - ``masks=True`` (transfer): COCO format only (``advdet.data.registry.build_dataset``), with the
      instance masks where every annotation has a segmentation, so mask victims get a segm mAP.
    """

    def __init__(self, data: str | os.PathLike, ann: str | os.PathLike | None = None, *, skip_bad: bool = False,
                 masks: bool = False, voc_split: str = "test") -> None:
        self.data, self.ann, self.skip_bad, self.masks, self.voc_split = data, ann, skip_bad, masks, voc_split
        self._by_size: dict[int, Any] = {}

    def _load(self, size: int) -> Any:
        if self.masks:
            from advdet.data.registry import build_dataset

            return build_dataset(self.data, self.ann, size=size, skip_bad=self.skip_bad)
        from advdet.bench.robustness_scoring import load_eval_dataset

        return load_eval_dataset(self.data, self.ann, size=size, voc_split=self.voc_split, skip_bad=self.skip_bad)

    def __getitem__(self, size: int) -> Any:
        size = int(size)
        if size not in self._by_size:
            self._by_size[size] = self._load(size)
        return self._by_size[size]

    def __contains__(self, size: object) -> bool:
        return size in self._by_size

    def __iter__(self) -> Iterator[int]:
        return iter(self._by_size)

    def __len__(self) -> int:
        return len(self._by_size)

    @property
    def first(self) -> Any:
        """The dataset built first (None before any): the reference for image ids, categories and the
        reader's report (the same source images at every size)."""
        return next(iter(self._by_size.values()), None)

    def batch(self, size: int, indices: Sequence[int]) -> tuple[Any, list[dict]]:
        """Images ``indices`` at ``size``, collated: (images (B, 3, size, size), targets)."""
        ds = self[size]
        return collate_detection([ds[i] for i in indices])


def index_batches(n: int, batch_size: int) -> list[list[int]]:
    """The dataset indices 0 .. n-1 in batches of ``batch_size`` (the last one shorter), in order."""
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


@dataclass
class CraftedBatch:
    """One crafted batch: dataset ``indices``, the clean images ``x`` (float, CPU) and their ``targets`` and
    letterbox ``params`` at the crafting size, the content ``mask``, the adversarial images ``adv`` (uint8
    when quantised, else float on the device), ``clean_u8`` (quantised runs), ``stats`` (per image
    ``rmse`` and ``linf`` of the quantised perturbation over the content, 0-255; quantised runs),
    the attack's ``diagnostics`` (or None) and the crafting wall / CPU seconds."""

    indices: list[int]
    x: torch.Tensor
    targets: list[dict]
    params: list
    mask: torch.Tensor
    adv: torch.Tensor
    clean_u8: torch.Tensor | None
    stats: dict | None
    diagnostics: Any
    seconds: float
    cpu_seconds: float

    @property
    def size(self) -> int:
        """The crafting input size."""
        return int(self.x.shape[-1])


def gt_targets(targets: Sequence[dict]) -> list[dict]:
    """What an attack that is given the ground truth sees: boxes, labels and letterbox per image."""
    return [{k: t[k] for k in ("boxes", "labels", "letterbox")} for t in targets]


class Crafter:
    """``attack`` under the one seed policy: ``craft(first_index, x, targets)`` resets the attack's and
    torch's generators with ``seed_batch(attack, seed, first_index)`` and runs it on ``device``.

    ``quantize`` (``batches``): the adversarial images as the uint8 a PNG would hold
    (``quantize_adv``: Linf <= floor(eps) after rounding, content only), with their perturbation
    statistics; ``False`` keeps the attack's float output (white-box evaluation, as RobustDet's)."""

    def __init__(self, attack: Any, seed: int, device, *, quantize: bool = True) -> None:
        self.attack, self.seed, self.device, self.quantize = attack, int(seed), device, quantize

    def craft(self, first_index: int, x: torch.Tensor, targets: list[dict] | None = None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attack's float output for the batch whose first image has dataset index ``first_index``."""
        seed_batch(self.attack, self.seed, first_index)
        kw = {} if mask is None else {"mask": mask.to(self.device)}
        return self.attack(x.to(self.device), targets, **kw)

    def diagnostics(self) -> Any:
        """The attack's diagnostics of its last batch (RAD's ``RADDiagnostics``), or None."""
        return (getattr(self.attack, "last_state", None) or {}).get("diagnostics")

    def batches(self, datasets: DatasetsBySize, size: int, batches: Sequence[Sequence[int]], *,
                use_gt: bool = False) -> Iterator[CraftedBatch]:
        """Craft every batch of dataset indices of ``batches`` at input size ``size``; only the letterboxed
        content changes (the mask). ``use_gt``: the attack sees the ground truth, else no targets."""
        for idx in batches:
            idx = list(idx)
            x, targets = datasets.batch(size, idx)
            params = [t["letterbox"] for t in targets]
            mask = letterbox_mask(params, size, size)
            tc, cc = time.perf_counter(), time.process_time()
            x_adv = self.craft(idx[0], x, gt_targets(targets) if use_gt else None, mask)
            diag = self.diagnostics()
            adv, clean_u8, stats = x_adv, None, None
            if self.quantize:
                adv = quantize_adv(x_adv.cpu(), x, getattr(self.attack, "eps", None), mask=mask)
                clean_u8 = to_uint8(x)
                stats = perturbation_stats(clean_u8, adv, mask=mask)
            del x_adv  # only ``adv`` outlives the batch (the float output on the device does not)
            yield CraftedBatch(idx, x, targets, params, mask, adv, clean_u8, stats, diag,
                               time.perf_counter() - tc, time.process_time() - cc)
