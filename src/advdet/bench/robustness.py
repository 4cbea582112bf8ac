"""The robustness benchmark of RobustDet (Dong, Wei, Lin, ECCV 2022, section 5.2, Table 1 and Fig. 7a/b):
white-box attacks against each model, mAP at IoU 0.5 per (model, attack).

``robustness_table(models, attacks, data)`` evaluates every model on the clean images and on the
adversarial images of every attack, crafted against that model itself (white box, ground-truth targets,
as RobustDet's evaluation does, ALGORITHMS.md 1.6). Columns (Table 1):

- ``clean``: no attack;
- ``cls`` (A_cls) / ``loc`` (A_loc): PGD on the classification / localization loss, eps 8, step 8
  (the reference's alpha = eps), 20 steps, sign, no random start;
- ``cwa``: the class-wise attack of CWAT with the same PGD;
- ``dag-robustdet``: **RobustDet's DAG** (:class:`advdet.attacks.dag_robustdet.RobustDetDAG`): every
  prior attacked towards a random other label, gamma 0.5, 150 iterations, no eps (ALGORITHMS.md 1.6);
  ``dag`` is the original DAG of Xie et al. (ALGORITHMS.md 2.5), as everywhere in advdet (the old column
  name ``dag-xie`` still works, with a deprecation note);
- any other registered detector attack by its registry name (``mtd``, ``pgd``, ``dag-eps``, ...).

Columns are names of the attack registry; their settings come from a spec (``cls:steps=5``, parsed by
``advdet.attacks.spec``) through ``attack_kwargs``.

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
import os
import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from advdet.bench.loading import load_detector
from advdet.bench.pipeline import Crafter, DatasetsBySize, index_batches
from advdet.bench.robustness_columns import (TABLE_ATTACKS, attack_targets, build_table_attack, check_attack_names,
                                             column_names)
from advdet.bench.robustness_scoring import (Column, boot_samples, is_voc, resolve_metric, score_column, voc_det,
                                             voc_gt)
from advdet.bench.runtime import jsonable, resolve_device
from advdet.models.detector import Detector

log = logging.getLogger(__name__)

__all__ = ["robustness_table", "robustness_steps_sweep"]


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
    datasets = DatasetsBySize(data, ann, skip_bad=skip_bad, voc_split=voc_split)
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
        cols = [Column(key, atk, st, [], []) for key, atk, st in plan]
        crafters: dict[str, Crafter | None] = {}
        for c in cols:
            overrides = attack_kwargs.get(c.attack)
            a = build_table_attack(c.attack, det, eps=eps, steps=c.steps, seed=seed, overrides=overrides)
            crafters[c.key] = None if a is None else Crafter(a, seed, dev, quantize=False)  # float, as RobustDet's
            c.settings = {"attack": "none"} if a is None else {"attack": a.name, **jsonable(a.hyperparameters())}
        voc = is_voc(ds)
        ids: list[int] = []
        gts: list[dict] = []
        batches = index_batches(n, batch_size)
        with _progress(progress) as prog:
            task = prog.add_task(f"{mname}", total=len(batches) * len(cols))
            for idx in batches:
                images, targets = datasets.batch(size, idx)
                x = images.to(dev)
                tg = attack_targets(targets, dev)
                ids += [int(t["image_id"]) for t in targets]
                gts += [voc_gt(t, voc) for t in targets]
                for c in cols:
                    prog.update(task, description=f"{mname}: {c.key}")
                    t0 = time.perf_counter()
                    cr = crafters[c.key]
                    x_in = x if cr is None else cr.craft(idx[0], x, tg)  # white box, ground truth, no mask
                    with torch.no_grad():
                        preds = det.predict(x_in)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    c.seconds += time.perf_counter() - t0
                    if resolved_metric == "coco50":
                        from advdet.models.evaluate import predictions_to_coco

                        c.coco_results += predictions_to_coco(preds, targets, ds.label_to_cat_id)
                    else:
                        c.voc_dets += [voc_det(p, t, voc) for p, t in zip(preds, targets)]
                    prog.advance(task)
        out["scores"][mname] = {c.key: score_column(resolved_metric, ds, c, ids, gts) for c in cols}
        if n_boot:
            from advdet.metrics.bootstrap import resample_indices

            indices = resample_indices(n, n_boot, boot_seed) if indices is None else indices
            boot[mname] = {c.key: boot_samples(resolved_metric, ds, c, ids, gts, indices) for c in cols}
        out["seconds"][mname] = {c.key: round(c.seconds, 3) for c in cols}
        out["attack_settings"][mname] = {c.key: c.settings for c in cols}
        log.info("%s: %s", mname, {k: v["map50"] for k, v in out["scores"][mname].items()})
    out["metric"] = resolved_metric
    out["images"] = n_images
    out["intervals"] = None
    # what the reader skipped, dropped or converted (the same source images at every size)
    out["data_report"] = datasets.first.report.as_dict() if len(datasets) else None
    if n_boot:
        from advdet.bench.intervals import grid_intervals

        points = {m: {k: v["map50"] for k, v in out["scores"][m].items()} for m in models}
        out["intervals"] = grid_intervals(points, boot, list(models), n_images=n_images, n_boot=n_boot,
                                          seed=boot_seed, level=ci_level)
        if samples_out is not None:  # the raw resamples, for statistics derived later (advdet reproduce)
            samples_out.update(indices=indices, cells=boot)
    return out


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
        attacks: columns: ``clean``, ``cls``, ``loc``, ``cwa``, ``dag-robustdet`` (RobustDet's DAG) or any
            registered detector attack (``dag``: Xie's DAG).
        data: ``shapes-val``, a COCO-format folder (with ``ann``), or a Pascal VOC folder (``voc_split``).
        metric: ``auto`` (VOC07 for VOC data, COCO AP50 otherwise), ``voc07`` or ``coco50``.
        limit: the first N images only. eps: Linf budget of the PGD-family attacks (0-255; step = eps).
        steps: iterations of every iterative attack (default: 20 for PGD, 150 for DAG).
        seed: attack seed; the batch starting at image i is crafted after ``seed_batch(attack, seed, i)``
            (:mod:`advdet.attacks.seeding`, the policy of every crafting command).
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
    attacks = column_names(attacks)
    check_attack_names(attacks)
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
    sweep = column_names([a for a in attacks if a != "clean"])
    check_attack_names(sweep)
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
