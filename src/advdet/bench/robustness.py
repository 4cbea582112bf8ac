"""The robustness benchmark of RobustDet (Dong, Wei, Lin, ECCV 2022, section 5.2, Table 1 and Fig. 7a/b):
white-box attacks against each model, mAP at IoU 0.5 per (model, attack).

``robustness_table(models, attacks, data)`` evaluates every model on the clean images and on the
adversarial images of every attack, crafted against that model itself (white box, ground-truth targets,
as RobustDet's evaluation does, ALGORITHMS.md 1.6). Columns (Table 1):

- ``clean``: no attack;
- ``cls`` (A_cls) / ``loc`` (A_loc): PGD on the classification / localization loss, eps 8, step 8
  (the reference's alpha = eps), 20 steps, sign, no random start;
- ``cwa``: the class-wise attack of CWAT with the same PGD;
- ``dag``: **RobustDet's DAG** (:class:`RobustDetDAG`, registered as ``dag-robustdet``), not the
  original DAG of Xie et al.: every prior attacked towards a random other label, gamma 0.5, 150
  iterations, no eps (ALGORITHMS.md 1.6); the column ``dag-xie`` is the original (``dag`` in the attack
  registry, ALGORITHMS.md 2.5);
- any other registered detector attack by its registry name (``mtd``, ``pgd``, ``dag-eps``, ...).

Metric (``metric=``): ``voc07`` is the VOC2007 11-point AP at IoU 0.5 (``advdet.metrics.voc_map``,
difficult objects ignored), ``coco50`` is COCO AP@0.5 (pycocotools' ``stats[1]``, through
``advdet.models.evaluate.score_results``); ``auto`` picks ``voc07`` for Pascal VOC folders and
``coco50`` otherwise, as the paper does for its two datasets.

``robustness_steps_sweep`` repeats the PGD attacks for several step counts (Fig. 7a/b).
Untrained models are refused (``UntrainedModelError``) unless ``allow_untrained=True`` or weights are
given.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from advdet.attacks.base import Attack
from advdet.attacks.dag_robustdet import RobustDetDAG
from advdet.attacks.registry import ATTACKS, CLASSIFIER_ATTACKS, build_attack
from advdet.bench.loading import UntrainedModelError, load_detector
from advdet.bench.runtime import jsonable, resolve_device
from advdet.data.collate import collate_detection
from advdet.data.errors import UnknownNameError
from advdet.data.letterbox import unletterbox_boxes
from advdet.models.detector import Detector

log = logging.getLogger(__name__)

__all__ = [
    "RobustDetDAG", "UntrainedModelError", "TABLE_ATTACKS", "COLUMN_ATTACKS", "PGD_FAMILY", "ATTACK_LABELS",
    "attack_label",
    "load_detector", "load_eval_dataset", "attack_targets", "resolve_metric", "build_table_attack", "robustness_table",
    "robustness_steps_sweep", "table_rows", "sweep_rows", "robustness_report", "sweep_figure",
    "table_figure",
]

#: the columns of RobustDet Table 1, in order
TABLE_ATTACKS = ("clean", "cls", "loc", "cwa", "dag")
#: attacks that take the table's ``eps`` (with step = eps, the reference's alpha = eps) and ``steps``
PGD_FAMILY = ("pgd", "cls", "loc", "cwa", "mtd")
ATTACK_LABELS = {"clean": "Clean", "cls": "A_cls", "loc": "A_loc", "cwa": "CWA", "dag": "DAG",
                 "dag-xie": "DAG (Xie)", "mtd": "MTD", "pgd": "PGD"}
#: table columns whose attack has another registry name: RobustDet's DAG, and the original DAG
COLUMN_ATTACKS = {"dag": "dag-robustdet", "dag-xie": "dag"}
METRICS = ("auto", "voc07", "coco50")


def attack_label(name: str) -> str:
    """The column title of an attack as in RobustDet Table 1 (``cls`` -> ``A_cls``)."""
    return ATTACK_LABELS.get(name, name)


# ------------------------------------------------------------------------------------ models and data
def _voc_root(path: Path) -> Path | None:
    for root in (path, path / "VOC2007"):
        if (root / "ImageSets" / "Main").is_dir() and (root / "Annotations").is_dir():
            return root
    return None


def load_eval_dataset(data: str | os.PathLike, ann: str | os.PathLike | None = None, *, size: int = 256,
                      voc_split: str = "test", skip_bad: bool = False):
    """The evaluation dataset for ``data``: a Pascal VOC folder (``ImageSets/Main`` + ``Annotations``,
    or a VOCdevkit folder holding ``VOC2007``) as ``VOCDetection(split=voc_split)``, anything else through
    ``advdet.data.registry.build_dataset`` (``shapes-val``, a COCO-format folder, images + ``ann``)."""
    path = Path(str(data)).expanduser()
    if ann is None and path.is_dir():
        root = _voc_root(path)
        if root is not None:
            from advdet.data.voc import VOCDetection

            return VOCDetection(root, split=voc_split, size=size, skip_bad=skip_bad)
    from advdet.data.registry import build_dataset

    return build_dataset(data, ann, size=size, skip_bad=skip_bad, with_masks=False)


def _is_voc(ds: Any) -> bool:
    from advdet.data.voc import VOCDetection

    return isinstance(ds, VOCDetection)


def resolve_metric(metric: str, dataset: Any) -> str:
    """``auto`` -> ``voc07`` for a VOC dataset, ``coco50`` otherwise; checks the name."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if metric == "auto":
        return "voc07" if _is_voc(dataset) else "coco50"
    if metric == "coco50" and not hasattr(dataset, "coco_gt"):
        raise ValueError(f"metric coco50 needs a COCO-format dataset; {type(dataset).__name__} has no "
                         "COCO ground truth (use --metric voc07)")
    return metric


# ------------------------------------------------------------------------------------ attacks
def _check_attack_names(attacks: Sequence[str]) -> None:
    if not attacks:
        raise ValueError("no attacks given (e.g. clean,cls,loc,cwa,dag)")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"attack listed twice: {list(attacks)}")
    for a in attacks:
        if a == "clean" or a in COLUMN_ATTACKS:
            continue
        if a not in ATTACKS:
            known = ", ".join(n for n in ATTACKS if n not in CLASSIFIER_ATTACKS)
            raise UnknownNameError(f"unknown attack {a!r}; the table's columns are {', '.join(TABLE_ATTACKS)}, "
                                   f"dag-xie, and any registered detector attack: {known}")
        if a in CLASSIFIER_ATTACKS:
            raise ValueError(f"attack {a!r} attacks an image classifier, not the detector itself; it has no "
                             "place in a white-box robustness table")


def build_table_attack(name: str, model: Detector, *, eps: float = 8.0, steps: int | None = None,
                       seed: int = 0, overrides: dict | None = None) -> Attack | None:
    """The attack of a table column on ``model`` (None for ``clean``).

    PGD-family columns (``pgd``, ``cls``, ``loc``, ``cwa``, ``mtd``) get ``eps`` with ``step = eps``
    (RobustDet's evaluation: eps = alpha = 8) and ``steps`` when given (default 20); ``dag`` is
    :class:`RobustDetDAG` and ``dag-xie`` the registry's ``dag`` (``steps`` when given, default 150; no
    eps); any other registered attack gets
    only ``steps`` when given. ``overrides`` (keyword arguments) win over all of these.
    """
    if name == "clean":
        return None
    kw: dict[str, Any] = {}
    reg_name = COLUMN_ATTACKS.get(name, name)
    if name in PGD_FAMILY:
        kw.update(eps=float(eps), step=float(eps))
    if steps is not None:
        kw["steps"] = int(steps)
    kw.update(overrides or {})
    kw["seed"] = int(seed)
    return build_attack(reg_name, model, **kw)


# ------------------------------------------------------------------------------------ scoring
@dataclass
class _Column:
    """One evaluated condition: an attack (or clean) at a step count, with its collected detections."""

    key: str
    attack: str
    steps: int | None
    coco_results: list
    voc_dets: list
    seconds: float = 0.0
    settings: dict | None = None


def attack_targets(targets: list[dict], dev: torch.device) -> list[dict]:
    """Ground truth for the attacks, on ``dev``: boxes and labels of a collated batch's targets (difficult
    VOC objects left out, as ssd.pytorch's test set does)."""
    out = []
    for t in targets:
        diff = t.get("difficult")
        keep = ~diff.bool() if diff is not None else torch.ones(len(t["labels"]), dtype=torch.bool)
        out.append({"boxes": t["boxes"][keep].to(dev).float(), "labels": t["labels"][keep].to(dev).long()})
    return out


def _voc_gt(t: dict, voc: bool) -> dict:
    boxes = unletterbox_boxes(t["boxes"].float(), t["letterbox"])
    if voc:  # back to VOC's 1-based inclusive pixels (the reader made them continuous 0-based)
        boxes = boxes + torch.tensor([1.0, 1.0, 0.0, 0.0])
    diff = t.get("difficult")
    return {"boxes": boxes, "labels": t["labels"], "difficult": diff if diff is not None else None}


def _voc_det(det: dict, t: dict, voc: bool) -> dict:
    boxes = unletterbox_boxes(det["boxes"].detach().cpu().float(), t["letterbox"])
    if voc:  # ssd.pytorch writes detections 1-based
        boxes = boxes + 1.0
    return {"boxes": boxes, "scores": det["scores"].detach().cpu(), "labels": det["labels"].detach().cpu()}


def _score(metric: str, ds: Any, col: _Column, ids: list[int], gts: list[dict]) -> dict:
    if metric == "coco50":
        from advdet.models.evaluate import score_results

        out = score_results(ds.coco_gt, col.coco_results, ids, False)
        return {"map50": float(out["map50"]), "map": float(out["map"]), "map75": float(out["map75"])}
    from advdet.metrics.voc_map import voc_map

    voc = _is_voc(ds)
    res = voc_map(gts, col.voc_dets, ds.num_classes, iou_threshold=0.5, use_07_metric=True,
                  pixel_offset=1.0 if voc else 0.0)
    m = res["map"]
    return {"map50": None if math.isnan(m) else float(m),
            "ap_per_class": [None if math.isnan(a) else float(a) for a in res["ap_per_class"]]}


def _boot_samples(metric: str, ds: Any, col: _Column, ids: list[int], gts: list[dict], indices) -> Any:
    """mAP50 of ``col`` on every bootstrap resample ``indices`` (the same protocol as ``_score``)."""
    from advdet.metrics.bootstrap import bootstrap_map, coco_image_matches, voc_image_matches

    if metric == "coco50":
        matches = coco_image_matches(ds.coco_gt, col.coco_results, ids)
    else:
        matches = voc_image_matches(gts, col.voc_dets, ds.num_classes, iou_threshold=0.5, use_07_metric=True,
                                    pixel_offset=1.0 if _is_voc(ds) else 0.0, image_ids=ids)
    return bootstrap_map(matches, indices)


@contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True, disable=not enabled) as prog:
        yield prog


def _evaluate_grid(models: Sequence[str], plan: list[tuple[str, str, int | None]], data: str | os.PathLike, *,
                   ann, metric: str, limit: int | None, batch_size: int, eps: float, seed: int, device,
                   weights: dict | None, allow_untrained: bool, detectors: dict | None, attack_kwargs: dict | None,
                   voc_split: str, skip_bad: bool, progress: bool, n_boot: int = 0, boot_seed: int = 0,
                   ci_level: float = 0.95, samples_out: dict | None = None) -> dict:
    """Evaluate every model under every (key, attack, steps) of ``plan``; returns the shared result fields
    plus ``scores`` {model: {key: score dict}}, ``seconds``, ``attack_settings`` and, when ``n_boot``,
    ``intervals`` (``advdet.bench.intervals.grid_intervals``: every cell on the same resamples)."""
    if not models:
        raise ValueError("no models given")
    if len(set(models)) != len(models):
        raise ValueError(f"model listed twice: {list(models)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    weights, detectors, attack_kwargs = dict(weights or {}), dict(detectors or {}), dict(attack_kwargs or {})
    unknown = set(weights) - set(models)
    if unknown:
        raise ValueError(f"weights given for models not in the list: {sorted(unknown)}")
    dev = resolve_device(device)
    datasets: dict[int, Any] = {}
    out: dict[str, Any] = {"data": str(data), "eps": float(eps), "seed": int(seed), "models": list(models),
                           "weights": {}, "scores": {}, "seconds": {}, "attack_settings": {}}
    resolved_metric = None
    n_images = None
    boot: dict[str, dict] = {}
    indices = None
    for mname in models:
        if mname in detectors:
            det, origin = detectors[mname], "given"
            if not isinstance(det, Detector):
                raise TypeError(f"detectors[{mname!r}] is a {type(det).__name__}, not a Detector")
        else:
            det, origin = load_detector(mname, weights=weights.get(mname), allow_untrained=allow_untrained)
        det = det.to(dev).eval()
        out["weights"][mname] = origin
        size = int(det.input_size)
        if size not in datasets:
            datasets[size] = load_eval_dataset(data, ann, size=size, voc_split=voc_split, skip_bad=skip_bad)
        ds = datasets[size]
        if int(det.num_classes) > int(ds.num_classes):
            raise ValueError(f"{mname} predicts {det.num_classes} classes but {data} has {ds.num_classes} "
                             "categories; benchmark a model trained on this dataset's classes")
        m = resolve_metric(metric, ds)
        if resolved_metric is not None and m != resolved_metric:  # pragma: no cover - same data for all
            raise ValueError("models resolved to different metrics")
        resolved_metric = m
        n = min(limit, len(ds)) if limit else len(ds)
        if n == 0:
            raise ValueError(f"{data}: no images to evaluate")
        n_images = n
        loader = DataLoader(Subset(ds, range(n)), batch_size=batch_size, shuffle=False,
                            collate_fn=collate_detection)
        cols = [_Column(key, atk, st, [], []) for key, atk, st in plan]
        attacks = {}
        for c in cols:
            overrides = attack_kwargs.get(c.attack)
            a = build_table_attack(c.attack, det, eps=eps, steps=c.steps, seed=seed, overrides=overrides)
            attacks[c.key] = a
            c.settings = {"attack": "none"} if a is None else {"attack": a.name, **jsonable(a.hyperparameters())}
        voc = _is_voc(ds)
        ids: list[int] = []
        gts: list[dict] = []
        n_batches = math.ceil(n / batch_size)
        with _progress(progress) as prog:
            task = prog.add_task(f"{mname}", total=n_batches * len(cols))
            start = 0
            for images, targets in loader:
                x = images.to(dev)
                tg = attack_targets(targets, dev)
                ids += [int(t["image_id"]) for t in targets]
                gts += [_voc_gt(t, voc) for t in targets]
                for c in cols:
                    prog.update(task, description=f"{mname}: {c.key}")
                    t0 = time.perf_counter()
                    a = attacks[c.key]
                    if a is None:
                        x_in = x
                    else:
                        a.manual_seed(seed + start)
                        x_in = a(x, tg)
                    with torch.no_grad():
                        preds = det.predict(x_in)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    c.seconds += time.perf_counter() - t0
                    if resolved_metric == "coco50":
                        from advdet.models.evaluate import predictions_to_coco

                        c.coco_results += predictions_to_coco(preds, targets, ds.label_to_cat_id)
                    else:
                        c.voc_dets += [_voc_det(p, t, voc) for p, t in zip(preds, targets)]
                    prog.advance(task)
                start += x.shape[0]
        out["scores"][mname] = {c.key: _score(resolved_metric, ds, c, ids, gts) for c in cols}
        if n_boot:
            from advdet.metrics.bootstrap import resample_indices

            indices = resample_indices(n, n_boot, boot_seed) if indices is None else indices
            boot[mname] = {c.key: _boot_samples(resolved_metric, ds, c, ids, gts, indices) for c in cols}
        out["seconds"][mname] = {c.key: round(c.seconds, 3) for c in cols}
        out["attack_settings"][mname] = {c.key: c.settings for c in cols}
        log.info("%s: %s", mname, {k: v["map50"] for k, v in out["scores"][mname].items()})
    out["metric"] = resolved_metric
    out["images"] = n_images
    out["intervals"] = None
    # what the reader skipped, dropped or converted (the same source images at every size)
    out["data_report"] = next(iter(datasets.values())).report.as_dict() if datasets else None
    if n_boot:
        from advdet.bench.intervals import grid_intervals

        points = {m: {k: v["map50"] for k, v in out["scores"][m].items()} for m in models}
        out["intervals"] = grid_intervals(points, boot, list(models), n_images=n_images, n_boot=n_boot,
                                          seed=boot_seed, level=ci_level)
        if samples_out is not None:  # the raw resamples, for statistics derived later (advdet reproduce)
            samples_out.update(indices=indices, cells=boot)
    return out


# ------------------------------------------------------------------------------------ public API
def robustness_table(models: Sequence[str], attacks: Sequence[str] = TABLE_ATTACKS,
                     data: str | os.PathLike = "shapes-val", *, ann: str | os.PathLike | None = None, metric: str = "auto", limit: int | None = None,
                     batch_size: int = 8, eps: float = 8.0, steps: int | None = None, seed: int = 0,
                     device: str | torch.device | None = None, weights: dict | None = None,
                     allow_untrained: bool = False, detectors: dict[str, Detector] | None = None,
                     attack_kwargs: dict[str, dict] | None = None, voc_split: str = "test",
                     skip_bad: bool = False, progress: bool = True, n_boot: int = 1000, boot_seed: int = 0,
                     ci_level: float = 0.95, samples_out: dict | None = None) -> dict:
    """RobustDet Table 1: mAP50 of every model on clean images and under every white-box attack.

    Args:
        models: zoo names (``ssd_vgg``, ``ssd_vgg-mtd``, ``robustdet``, ...) or ``torchvision:BUILDER``;
            the first is the baseline the report's arrows compare to.
        attacks: columns: ``clean``, ``cls``, ``loc``, ``cwa``, ``dag`` (RobustDet's DAG) or any registered
            detector attack.
        data: ``shapes-val``, a COCO-format folder (with ``ann``), or a Pascal VOC folder (``voc_split``).
        metric: ``auto`` (VOC07 for VOC data, COCO AP50 otherwise), ``voc07`` or ``coco50``.
        limit: the first N images only. eps: Linf budget of the PGD-family attacks (0-255; step = eps).
        steps: iterations of every iterative attack (default: 20 for PGD, 150 for DAG).
        seed: attack seed; batch b starting at image i uses ``seed + i``.
        weights: {model: weights file}; models without an entry use the zoo's shipped weights.
        allow_untrained: benchmark random weights instead of refusing (tests, smoke runs).
        detectors: {model name: Detector} already built (Python API; skips loading).
        attack_kwargs: {attack: keyword overrides} passed to ``build_attack``.
        n_boot, boot_seed, ci_level: bootstrap confidence intervals of every cell (``n_boot`` resamples of
            the images drawn with ``boot_seed``, level ``ci_level``; 0: none).
        samples_out: when given (and ``n_boot``), filled with ``indices`` (the resamples) and ``cells``
            {model: {column: mAP50 per resample}}, for statistics derived later on the same resamples.

    Returns a JSON-able dict: ``metric``, ``data``, ``images``, ``eps``, ``steps``, ``seed``, ``models``,
    ``attacks``, ``map50`` {model: {attack: value}}, ``seconds`` {model: {attack: s}} (attack + predict
    wall time), ``scores`` (the metric's details), ``weights`` (origin per model), ``attack_settings``,
    ``intervals`` (None without ``n_boot``): ``map50`` {model: {attack: {value, lo, hi}}} and ``paired``
    {model: {attack: interval of model - first model}}, on the same resamples.
    """
    attacks = list(attacks)
    _check_attack_names(attacks)
    plan = [(a, a, steps) for a in attacks]
    out = _evaluate_grid(models, plan, data, ann=ann, metric=metric, limit=limit, batch_size=batch_size, eps=eps,
                         seed=seed, device=device, weights=weights, allow_untrained=allow_untrained,
                         detectors=detectors, attack_kwargs=attack_kwargs, voc_split=voc_split,
                         skip_bad=skip_bad, progress=progress, n_boot=n_boot, boot_seed=boot_seed, ci_level=ci_level,
                         samples_out=samples_out)
    result = {"kind": "robustness_table", "metric": out["metric"], "data": out["data"], "images": out["images"],
              "eps": out["eps"], "steps": steps, "seed": out["seed"], "models": list(models), "attacks": attacks,
              "map50": {m: {a: out["scores"][m][a]["map50"] for a in attacks} for m in models},
              "seconds": out["seconds"], "scores": out["scores"], "weights": out["weights"],
              "attack_settings": out["attack_settings"], "intervals": out["intervals"],
              "data_report": out["data_report"]}
    return result


def robustness_steps_sweep(models: Sequence[str], attacks: Sequence[str] = ("cls", "loc"),
                           data: str | os.PathLike = "shapes-val", *, steps: Sequence[int] = (1, 5, 10, 20, 50),
                           include_clean: bool = True, ann=None, metric: str = "auto", limit: int | None = None,
                           batch_size: int = 8, eps: float = 8.0, seed: int = 0, device=None,
                           weights: dict | None = None, allow_untrained: bool = False,
                           detectors: dict[str, Detector] | None = None, attack_kwargs: dict | None = None,
                           voc_split: str = "test", skip_bad: bool = False, progress: bool = True,
                           n_boot: int = 1000, boot_seed: int = 0, ci_level: float = 0.95,
                           samples_out: dict | None = None) -> dict:
    """Robustness against the number of attack steps (RobustDet Fig. 7a/b: A_cls and A_loc, eps 8).

    Every attack of ``attacks`` (``clean`` is dropped from the sweep) runs once per step count in
    ``steps``; the clean mAP50 is measured once (``include_clean``). Returns a JSON-able dict: ``kind``
    ``"steps_sweep"``, ``metric``, ``data``, ``images``, ``eps``, ``steps`` (the list), ``models``,
    ``attacks``, ``map50`` {model: {attack: [value per step count]}}, ``clean`` {model: value},
    ``seconds`` {model: {attack: [s per step count]}}, ``weights``, ``intervals`` (as
    ``robustness_table``'s, keyed by ``clean`` and ``ATTACK@STEPS``; None when ``n_boot`` is 0).
    """
    steps = [int(s) for s in steps]
    if not steps or any(s < 1 for s in steps):
        raise ValueError(f"steps must be a non-empty list of counts >= 1, got {steps}")
    if len(set(steps)) != len(steps):
        raise ValueError(f"step count listed twice: {steps}")
    sweep = [a for a in attacks if a != "clean"]
    _check_attack_names(sweep)
    plan: list[tuple[str, str, int | None]] = [("clean", "clean", None)] if include_clean else []
    plan += [(f"{a}@{s}", a, s) for a in sweep for s in steps]
    out = _evaluate_grid(models, plan, data, ann=ann, metric=metric, limit=limit, batch_size=batch_size, eps=eps,
                         seed=seed, device=device, weights=weights, allow_untrained=allow_untrained,
                         detectors=detectors, attack_kwargs=attack_kwargs, voc_split=voc_split,
                         skip_bad=skip_bad, progress=progress, n_boot=n_boot, boot_seed=boot_seed, ci_level=ci_level,
                         samples_out=samples_out)
    sc, secs = out["scores"], out["seconds"]
    return {"kind": "steps_sweep", "metric": out["metric"], "data": out["data"], "images": out["images"],
            "eps": out["eps"], "steps": steps, "seed": out["seed"], "models": list(models), "attacks": sweep,
            "map50": {m: {a: [sc[m][f"{a}@{s}"]["map50"] for s in steps] for a in sweep} for m in models},
            "clean": {m: sc[m]["clean"]["map50"] for m in models} if include_clean else None,
            "seconds": {m: {a: [secs[m][f"{a}@{s}"] for s in steps] for a in sweep} for m in models},
            "weights": out["weights"], "attack_settings": out["attack_settings"], "intervals": out["intervals"],
            "data_report": out["data_report"]}


# ------------------------------------------------------------------------------------ presentation
def _pct(v: float | None) -> float | None:
    return None if v is None else round(100.0 * v, 1)


def table_rows(result: dict, *, deltas: bool = True) -> tuple[list[str], list[list]]:
    """Table 1 layout of a ``robustness_table`` result: columns ``Method`` + one per attack; cells are
    mAP50 in percent (one decimal), with ``↑d`` / ``↓d`` against the first model when ``deltas``."""
    models, attacks = result["models"], result["attacks"]
    cols = ["Method"] + [attack_label(a) for a in attacks]
    base = models[0]
    rows = []
    for m in models:
        row: list = [m]
        for a in attacks:
            v = _pct(result["map50"][m][a])
            b = _pct(result["map50"][base][a])
            if v is None:
                row.append(None)
            elif deltas and m != base and b is not None:
                d = round(v - b, 1)
                row.append(f"{v:.1f} {'↑' if d > 0 else '↓' if d < 0 else '='}{abs(d):.1f}")
            else:
                row.append(f"{v:.1f}")
        rows.append(row)
    return cols, rows


def sweep_rows(result: dict, attack: str) -> tuple[list[str], list[list]]:
    """One table per swept attack: rows models, columns the step counts (mAP50 in percent)."""
    cols = ["Method"] + (["Clean"] if result.get("clean") else []) + [f"{s} steps" for s in result["steps"]]
    rows = []
    for m in result["models"]:
        row: list = [m]
        if result.get("clean"):
            row.append(_pct(result["clean"][m]))
        row += [_pct(v) for v in result["map50"][m][attack]]
        rows.append(row)
    return cols, rows


def _metric_text(result: dict) -> str:
    return ("VOC2007 11-point AP at IoU 0.5 (difficult objects ignored)" if result["metric"] == "voc07"
            else "COCO AP at IoU 0.5 (pycocotools stats[1])")


def table_figure(result: dict):
    """Grouped bars: mAP50 (%) per attack, one bar per model (a matplotlib Figure, Agg)."""
    from advdet.bench.plots import new_figure

    models, attacks = result["models"], result["attacks"]
    fig = new_figure(1.2 + 1.1 * len(attacks) * max(1, len(models)) / 2, 3.2)
    ax = fig.subplots()
    w = 0.8 / len(models)
    for i, m in enumerate(models):
        vals = [_pct(result["map50"][m][a]) or 0.0 for a in attacks]
        ax.bar([j + (i - (len(models) - 1) / 2) * w for j in range(len(attacks))], vals, w, label=m)
    ax.set_xticks(range(len(attacks)), [attack_label(a) for a in attacks])
    ax.set_ylabel("mAP50 (%)")
    ax.set_ylim(0, 102)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return fig


def sweep_figure(result: dict):
    """RobustDet Fig. 7a/b: mAP50 (%) against the number of attack steps, one panel per attack."""
    from advdet.bench.plots import new_figure

    attacks = result["attacks"]
    fig = new_figure(3.8 * len(attacks), 3.0)
    fig.subplots_adjust(wspace=0.35)
    axes = fig.subplots(1, len(attacks), squeeze=False)[0]
    for ax, a in zip(axes, attacks):
        for m in result["models"]:
            ax.plot(result["steps"], [_pct(v) for v in result["map50"][m][a]], marker="o", label=m)
        ax.set_title(f"{attack_label(a)}, eps = {result['eps']:g}", fontsize=9)
        ax.set_ylim(-2, 102)
        ax.set_xlabel("attack steps")
        ax.set_ylabel("mAP50 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def robustness_report(result: dict, report: Any | None = None) -> Any:
    """Add a ``robustness_table`` or ``robustness_steps_sweep`` result (tables, a figure, the settings) to
    ``report`` (an ``advdet.bench.report.Report``; a new one when None) and return it."""
    from advdet.bench.report import Report

    sweep = result.get("kind") == "steps_sweep"
    rep = report or Report("Robustness benchmark" + (" (attack steps)" if sweep else ""))
    weights = ", ".join(f"`{m}`: {w}" for m, w in result["weights"].items())
    rep.add_text(f"White-box attacks against each model on `{result['data']}` ({result['images']} images); "
                 f"metric: {_metric_text(result)}. PGD-family budget eps = {result['eps']:g} (step = eps); "
                 f"DAG is RobustDet's (150 steps, gamma 0.5, no eps) unless steps are overridden. "
                 f"Weights: {weights}.")
    if sweep:
        for a in result["attacks"]:
            cols, rows = sweep_rows(result, a)
            rep.add_table(f"{attack_label(a)}: mAP50 (%) against the number of steps (RobustDet Fig. 7)",
                          cols, rows, note=f"eps = {result['eps']:g}, step = eps")
        rep.add_figure("mAP50 against attack steps", sweep_figure(result))
        _add_interval_tables(rep, result)
    else:
        cols, rows = table_rows(result)
        steps = "class defaults (PGD 20, DAG 150)" if result["steps"] is None else str(result["steps"])
        rep.add_table("mAP50 (%) under white-box attacks (RobustDet Table 1 layout)", cols, rows,
                      note=(f"Arrows: change against {result['models'][0]}. " if len(result["models"]) > 1 else "")
                      + f"Steps: {steps}.")
        rep.add_table("Seconds per model and attack (attack + prediction)",
                      ["Method"] + [attack_label(a) for a in result["attacks"]],
                      [[m] + [result["seconds"][m][a] for a in result["attacks"]] for m in result["models"]])
        _add_interval_tables(rep, result)
        rep.add_figure("mAP50 per attack", table_figure(result))
    return rep


def _add_interval_tables(rep: Any, result: dict) -> None:
    """The bootstrap intervals (``advdet.bench.intervals``) of a result, when it has them."""
    from advdet.bench import intervals as ci

    block = result.get("intervals")
    if not block:
        return
    note = ci.interval_note(block)
    if result.get("kind") == "steps_sweep":
        for a in result["attacks"]:
            rep.add_table(f"{attack_label(a)}: mAP50 (%) with bootstrap intervals", *ci.sweep_interval_table(result, a),
                          note=note)
        return
    rep.add_table("mAP50 (%) with bootstrap intervals", *ci.robustness_interval_table(result, ATTACK_LABELS),
                  note=note)
    paired = ci.robustness_paired_table(result, ATTACK_LABELS)
    if paired is not None:
        rep.add_table(f"Paired: each model minus {block['baseline']}, mAP50 (points)", *paired,
                      note=note + "; both models on the same resamples")
