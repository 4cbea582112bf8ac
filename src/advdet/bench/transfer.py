"""The transfer benchmark of RAD section 4 (Tables 1-4, 7, 8; Fig. 7): craft adversarial images once per
(surrogate, attack), evaluate every victim on them.

The rows (:mod:`advdet.bench.transfer_rows`): ``No Attack``, ``Ablation`` and one row per attack (and per
sweep value). Columns: the victims. Cells: COCO box mAP@[.5:.95] (also mAP50 and mAP75; segmentation mAP
for mask models, Table 4). Per row (:mod:`advdet.bench.transfer_scores`):

- ``black_box``: the mean over the black-box victims, i.e. the victims other than the row's surrogate
  (for rows without a detector surrogate - No Attack, Ablation, classifier attacks - the victims other
  than any detector surrogate of the run, so the means are over the same models as the attack rows';
  when that leaves none, all victims);
- ``white_box``: the surrogate's own value when it is also a victim;
- ``perturbation``: mean per-image RMSE and Linf (0-255) of the saved (quantised) perturbation over the
  letterboxed image content (RAD Table 5's RMSE);
- ``failure``: per victim the disappearance / misclassification / hallucination rates against the
  victim's clean predictions (:mod:`advdet.bench.failure_rates`).

How images flow: the dataset is letterboxed to the crafting model's input size (``S`` x ``S``, zero
padding; RAD appendix E.1), the attack runs on a batch, the result is quantised with
``advdet.attacks.quantize.quantize_adv`` (the uint8 image a PNG would hold, Linf <= floor(eps) after
rounding) and, batch by batch, every victim predicts on it; nothing is written to disk. A victim of
another input size gets the quantised image content re-letterboxed to its own size. Attacks change only
the image content, never the padding (``valid_only=True``, RAD's ``clip_valid``), so what a victim sees
does not depend on its input size. The attacker never sees the ground truth (``use_gt=False``): detection
attacks use the surrogate's clean predictions, classifier attacks the classifier's clean prediction
(RAD sec. 4.3).

Output: :mod:`advdet.bench.transfer_report` (JSON, tables, figures), :mod:`advdet.bench.transfer_examples`
(the report's image grids).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from advdet.attacks.batches import letterbox_mask
from advdet.attacks.ensemble import is_ensemble_name
from advdet.attacks.quantize import quantize_adv, to_uint8
from advdet.attacks.registry import ATTACKS
from advdet.attacks.seeding import seed_batch
from advdet.bench.failure_rates import DEFAULT_IOU, DEFAULT_SCORE_THRESH, FailureCounter, threshold_detections
from advdet.bench.loading import LoadedModel, UntrainedModelError, load_ensemble, load_model
from advdet.bench.pipeline import DatasetsBySize
from advdet.bench.runtime import release_memory, resolve_device
from advdet.bench.transfer_examples import add_relevance, clean_example_rows, record_examples
from advdet.bench.transfer_report import json_ready, transfer_report
from advdet.bench.transfer_rows import (NO_ATTACK, build_row_attack, ensemble_members, is_classifier_attack,
                                        plan_rows, sweep_values_of)
from advdet.bench.transfer_scores import row_record, victim_metrics
from advdet.data.letterbox import reletterbox
from advdet.metrics.perturbation import perturbation_stats
from advdet.models.evaluate import predictions_to_coco

log = logging.getLogger(__name__)

__all__ = ["transfer_matrix", "ModelUnavailable"]

#: the error of a model that cannot be loaded as asked (the loader's ``UntrainedModelError``)
ModelUnavailable = UntrainedModelError


# ------------------------------------------------------------------------------------------------- the benchmark
def _make_progress(progress: bool):
    if not progress:
        return nullcontext(None)
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), transient=False)


def transfer_matrix(surrogates: list[str], attacks: list[str], victims: list[str], data: str, *, ann=None,
                    eps: float | Sequence[float] = 16.0, limit: int | None = None, batch_size: int = 8, seed: int = 0,
                    device=None, attack_kwargs: Mapping[str, dict] | None = None, out_dir=None,
                    weights: Mapping[str, str] | None = None, progress: bool = True,
                    sizes: Mapping[str, int] | None = None,
                    sweep: str | None = None, sweep_values: Sequence | None = None,
                    classifier: str = "classifier", allow_untrained: bool = False,
                    models: Mapping[str, nn.Module] | None = None, skip_unavailable: bool = False,
                    score_thresh: float = DEFAULT_SCORE_THRESH, iou: float = DEFAULT_IOU,
                    examples: int = 2, relevance: bool = True, skip_bad: bool = False, use_gt: bool = False,
                    on_progress: Callable[[str], None] | None = None, n_boot: int = 1000, boot_seed: int = 0,
                    ci_level: float = 0.95, paired_with: str = "rad",
                    leave_one_out: bool | Sequence[str] = False) -> dict:
    """The transfer table of RAD sec. 4 (see the module docstring).

    Args:
        surrogates: detector(s) that craft the detection attacks (zoo names or ``torchvision:BUILDER``); a
            name ``a+b+c`` is one ensemble of those models (``advdet.attacks.ensemble``).
        attacks: registry names (``advdet.attacks.registry``); ``gaussian`` is always the Ablation row.
        victims: models evaluated on every row.
        data: ``shapes-val``, ``shapes-train`` or a COCO-format folder (``ann``: its instances JSON).
        eps: Linf budget (0-255) passed to every attack that has one; a list is the eps sweep.
        limit: the first ``limit`` images (default all).
        attack_kwargs: per attack name, extra keyword arguments (e.g. ``{"rad": {"steps": 5}}``).
        out_dir: when given, write ``transfer.json`` and the report (``report.md``, ``index.html``) there.
        weights: per model name a weights file (overrides the zoo's).
        sizes: per ``torchvision:`` model name its letterbox size (RAD: 416; default the builder's).
        sweep, sweep_values: ``nodes`` / ``technique`` / ``node_type`` (or ``eps``) and its values.
        classifier: the surrogate of the classifier attacks.
        allow_untrained: build zoo models without weights randomly initialised instead of failing.
        models: per name an already built model (used instead of building it).
        skip_unavailable: skip unknown attacks and models without weights with a note in ``skipped``
            instead of raising.
        score_thresh, iou: of the failure rates.
        examples: how many images (the first ones) are kept for the report's image grids.
        relevance: compute relevance maps (before / after) on the surrogate for the grids.
        use_gt: give the attacks the ground-truth boxes and labels (default: they see only the image, as
            a transfer attacker; detection attacks then use the surrogate's clean predictions).
        n_boot, boot_seed, ci_level: bootstrap confidence intervals of every cell's box mAP50, every
            black-box mean and the paired differences between the ``paired_with`` attack's rows and the
            baselines (``advdet.bench.intervals.transfer_intervals``): ``n_boot`` resamples of the images
            (0: none), drawn with ``boot_seed``, at level ``ci_level``.
        leave_one_out: ``True`` (pool: the victims) or a list of models: per detector attack, one row per
            pool model, crafted on the ensemble of the others (``ens-<attack> without <model>``).

    Returns a JSON-ready dict (see ``json_ready``; the ``_examples`` key holds the grid images):
    ``rows`` (label, attack, kind, surrogate, settings, metrics per victim, black_box, white_box,
    perturbation, failure, seconds), ``victims``, ``surrogates``, ``models`` (their info), ``images``,
    ``image_ids``, ``skipped``, ``bootstrap`` (the intervals, None when ``n_boot`` is 0) and the settings.
    """
    t_start, cpu_start = time.perf_counter(), time.process_time()
    dev = resolve_device(device)
    weights = dict(weights or {})
    models = dict(models or {})
    sizes = dict(sizes or {})
    skipped: list[str] = []
    notes: list[str] = []
    diagnostics: dict[int, Any] = {}  # per row: the attack's own diagnostics (RAD), merged over batches
    registry = ATTACKS

    def say(msg: str) -> None:
        log.info(msg)
        if on_progress is not None:
            on_progress(msg)

    # ---- attacks
    wanted = []
    for a in attacks:
        if a in registry or a == "gaussian":
            wanted.append(a)
        elif skip_unavailable:
            skipped.append(f"attack {a}: not registered (known: {', '.join(registry)})")
        else:
            raise KeyError(f"unknown attack {a!r}; registered: {', '.join(registry)}")

    # ---- models
    loaded: dict[str, LoadedModel] = {}

    def get(name: str) -> LoadedModel | None:
        if name in loaded:
            return loaded[name]
        if is_ensemble_name(name):
            lm = load_ensemble(name, get)
            if lm is None:
                skipped.append(f"ensemble {name}: a member is unavailable")
                return None
            loaded[name] = lm
            return lm
        try:
            lm = load_model(name, weights=weights.get(name), allow_untrained=allow_untrained, device=dev,
                            model=models.get(name), input_size=sizes.get(name))
        except ModelUnavailable as err:
            if not skip_unavailable:
                raise
            skipped.append(f"model {name}: {err}")
            return None
        loaded[name] = lm
        return lm

    victim_models = [v for v in dict.fromkeys(victims) if get(v) is not None]
    for v in victim_models:
        if loaded[v].kind != "detector":
            raise ValueError(f"victim {v!r} is not a detector")
    if not victim_models:
        raise ModelUnavailable("no victim model is available")
    sur_models = [s for s in dict.fromkeys(surrogates) if get(s) is not None]
    for s in sur_models:
        if loaded[s].kind != "detector":
            raise ValueError(f"surrogate {s!r} is not a detector (classifier attacks use `classifier=`)")
    loo_pool: list[str] | None = None
    if leave_one_out:
        loo_pool = list(victim_models) if leave_one_out is True else [m for m in dict.fromkeys(leave_one_out)
                                                                      if get(m) is not None]
        for h in loo_pool:
            if get("+".join(p for p in loo_pool if p != h)) is None:
                raise ModelUnavailable(f"leave-one-out: the ensemble without {h} cannot be loaded")
    if any(is_classifier_attack(a) for a in wanted) and get(classifier) is None:
        dropped = [a for a in wanted if is_classifier_attack(a)]
        skipped.append(f"attacks {', '.join(dropped)}: classifier {classifier!r} unavailable")
        wanted = [a for a in wanted if not is_classifier_attack(a)]
    if not sur_models and not loo_pool and any(not is_classifier_attack(a) and a != "gaussian" for a in wanted):
        dropped = [a for a in wanted if not is_classifier_attack(a) and a != "gaussian"]
        skipped.append(f"attacks {', '.join(dropped)}: no detector surrogate available")
        wanted = [a for a in wanted if is_classifier_attack(a) or a == "gaussian"]

    rows = plan_rows(sur_models, wanted, eps=eps, sweep=sweep, sweep_values=sweep_values, classifier=classifier,
                     attack_kwargs=attack_kwargs, registry=registry, notes=notes, leave_one_out=loo_pool)

    # ---- data (one letterboxed copy per input size; same image order in each; masks for mask victims)
    datasets = DatasetsBySize(data, ann, skip_bad=skip_bad, masks=True)

    crafters = list(dict.fromkeys(list(sur_models) + [r.surrogate for r in rows if r.kind == "detector"]))
    ref_size = loaded[crafters[0]].input_size if crafters else loaded[victim_models[0]].input_size
    ds0 = datasets[ref_size]
    n = len(ds0) if limit is None else min(int(limit), len(ds0))
    if n <= 0:
        raise ValueError(f"{data}: no images to evaluate")
    batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    gt = ds0.coco_gt
    cat_names = [c["name"] for c in ds0.categories]
    cat_name_by_id = {c["id"]: c["name"] for c in ds0.categories}
    image_ids = [int(ds0.image_ids[i]) for i in range(n)]
    n_examples = min(int(examples), n)
    det_surrogates = {m for s in crafters for m in ensemble_members(s)}
    rel_model = loaded[crafters[0]] if crafters else None

    # per row and victim: COCO results; per victim: clean thresholded predictions (failure-rate reference)
    results: dict[tuple[int, str], list] = {}
    clean_ref: dict[str, list[dict]] = {v: [] for v in victim_models}
    failure: dict[tuple[int, str], FailureCounter] = {}
    ex_store: list[dict] = [{"index": i, "image_id": image_ids[i], "rows": {}} for i in range(n_examples)]
    row_out: list[dict] = []

    @torch.no_grad()
    def predict(v: str, x: torch.Tensor) -> list[dict]:
        return loaded[v].model.predict(x.to(dev))

    total_steps = len(victim_models) * len(batches) + (len(rows) - 1) * len(batches)
    with _make_progress(progress) as prog:
        task = prog.add_task("transfer", total=total_steps) if prog is not None else None

        def advance(desc: str) -> None:
            if prog is not None:
                prog.update(task, advance=1, description=desc)

        # ---- No Attack: every victim on the clean images at its own input size
        t0, c0 = time.perf_counter(), time.process_time()
        say(f"{NO_ATTACK}: {len(victim_models)} victims on {n} images")
        for v in victim_models:
            results[(0, v)] = []
            failure[(0, v)] = FailureCounter(score_thresh, iou)
            for idx in batches:
                x, targets = datasets.batch(loaded[v].input_size, idx)
                outs = predict(v, x)
                results[(0, v)] += predictions_to_coco(outs, targets, ds0.label_to_cat_id)
                for o in outs:
                    c = threshold_detections(o, score_thresh)
                    clean_ref[v].append(c)
                    failure[(0, v)].update(c, c, thresholded=True)
                advance(f"{NO_ATTACK} · {v}")
        clean_example_rows(ex_store, ds0, victim_models, clean_ref, loaded)
        row_seconds = {0: {"craft": 0.0, "eval": time.perf_counter() - t0, "craft_cpu": 0.0,
                           "eval_cpu": time.process_time() - c0}}
        pert: dict[int, dict] = {0: {"rmse": 0.0, "linf": 0.0, "linf_max": 0.0}}

        # ---- every other row: craft once, quantise, all victims
        for ri, spec in enumerate(rows[1:], start=1):
            crafter = loaded[spec.surrogate] if spec.surrogate is not None else None
            size = crafter.input_size if crafter is not None else ref_size
            atk = build_row_attack(spec, crafter.model if crafter is not None else None, seed, dev, registry)
            say(f"{spec.label}: crafting on {spec.surrogate or '-'} ({n} images, {size}px)")
            t_craft = t_eval = c_craft = c_eval = 0.0
            rmse, linf = [], []
            for v in victim_models:
                results[(ri, v)] = []
                failure[(ri, v)] = FailureCounter(score_thresh, iou)
            for idx in batches:
                x, targets = datasets.batch(size, idx)
                params = [t["letterbox"] for t in targets]
                mask = letterbox_mask(params, size, size)
                tc, cc = time.perf_counter(), time.process_time()
                seed_batch(atk, seed, idx[0])
                tg = [{k: t[k] for k in ("boxes", "labels", "letterbox")} for t in targets] if use_gt else None
                x_adv = atk(x.to(dev), tg, mask=mask.to(dev))
                diag = (getattr(atk, "last_state", None) or {}).get("diagnostics")
                if diag is not None:  # RAD's (advdet.attacks.rad.RADDiagnostics), merged over batches
                    diagnostics[ri] = diag if ri not in diagnostics else diagnostics[ri].merge(diag)
                q = quantize_adv(x_adv.cpu(), x, getattr(atk, "eps", None), mask=mask)
                clean_u8 = to_uint8(x)
                st = perturbation_stats(clean_u8, q, mask=mask)
                rmse += st["rmse"]
                linf += st["linf"]
                t_craft += time.perf_counter() - tc
                c_craft += time.process_time() - cc
                te, ce = time.perf_counter(), time.process_time()
                preds, params_v = {}, {}
                for v in victim_models:
                    sv = loaded[v].input_size
                    if sv == size:
                        xv, pv = q.float() / 255.0, params
                    else:
                        xv, pv = reletterbox(q, params, sv)
                    outs = predict(v, xv)
                    preds[v], params_v[v] = outs, pv
                    tv = [{"letterbox": p, "image_id": t["image_id"]} for p, t in zip(pv, targets)]
                    results[(ri, v)] += predictions_to_coco(outs, tv, ds0.label_to_cat_id)
                    for j, o in enumerate(outs):
                        failure[(ri, v)].update(clean_ref[v][idx[j]], threshold_detections(o, score_thresh),
                                                thresholded=True)
                t_eval += time.perf_counter() - te
                c_eval += time.process_time() - ce
                if idx[0] < n_examples:
                    record_examples(ex_store, ri, idx, clean_u8, q, params, preds, params_v, victim_models,
                                    score_thresh)
                del x_adv, preds
                release_memory()
                advance(spec.label)
            row_seconds[ri] = {"craft": t_craft, "eval": t_eval, "craft_cpu": c_craft, "eval_cpu": c_eval}
            pert[ri] = {"rmse": float(np.mean(rmse)), "linf": float(np.mean(linf)), "linf_max": float(np.max(linf))}

    # ---- relevance before / after on the surrogate (grid images)
    if relevance and n_examples:
        add_relevance(ex_store, rows, loaded, rel_model, dev)

    # ---- scores
    for ri, spec in enumerate(rows):
        metrics = {v: victim_metrics(gt, results[(ri, v)], image_ids, cat_name_by_id, loaded[v].has_masks)
                   for v in victim_models}
        fail = {v: failure[(ri, v)].rates() for v in victim_models}
        row_out.append(row_record(spec, metrics, fail, victim_models, det_surrogates, pert[ri], row_seconds[ri],
                                  diagnostics.get(ri)))

    boot, boot_samples = None, {}
    if n_boot:
        from advdet.bench.intervals import transfer_intervals

        say(f"bootstrap: {n_boot} resamples of {n} images")
        boot = transfer_intervals(row_out, results, gt, image_ids, victim_models, n_boot=n_boot, seed=boot_seed,
                                  level=ci_level, reference=paired_with, samples_out=boot_samples)
    eps_out = [float(e) for e in eps] if isinstance(eps, (list, tuple)) else float(eps)
    out = {
        "kind": "transfer", "data": str(data), "ann": None if ann is None else str(ann), "images": n,
        "image_ids": image_ids, "eps": eps_out, "seed": seed, "batch_size": batch_size,
        "score_thresh": score_thresh, "iou": iou, "surrogates": sur_models, "classifier": classifier,
        "victims": victim_models, "attacks": wanted, "leave_one_out": loo_pool,
        "sweep": None if not any(r.sweep for r in rows) else {"name": next(r.sweep for r in rows if r.sweep),
                                                              "values": sweep_values_of(rows)},
        "models": {k: m.info() for k, m in loaded.items()}, "class_names": cat_names,
        "rows": row_out, "bootstrap": boot, "skipped": skipped, "notes": notes, "device": str(dev),
        "data_report": ds0.report.as_dict(),  # what the reader skipped, dropped or converted
        "seconds": round(time.perf_counter() - t_start, 3),
        "cpu_seconds": round(time.process_time() - cpu_start, 3), "torch_threads": torch.get_num_threads(),
        "_examples": ex_store, "_row_specs": rows, "_bootstrap_samples": boot_samples,
    }
    if out_dir is not None:
        from pathlib import Path

        from advdet.data.io import atomic_write_json

        d = Path(out_dir)
        atomic_write_json(d / "transfer.json", json_ready(out), indent=2)
        transfer_report(out).write(d)
    return out
