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

The parts (the crafting pipeline the other benchmarks share): :class:`advdet.bench.pipeline.ModelSet` loads
the models, :class:`advdet.bench.pipeline.DatasetsBySize` letterboxes the data per input size,
:class:`advdet.bench.pipeline.Crafter` crafts a row batch by batch (seed policy, quantisation, perturbation
statistics), :class:`advdet.bench.transfer_victims.VictimSet` has every victim predict and keeps the COCO
results and failure counts, :class:`advdet.bench.transfer_scores.RowResult` is a row's typed result.

Output: :mod:`advdet.bench.transfer_report` (JSON, tables, figures), :mod:`advdet.bench.transfer_examples`
(the report's image grids).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from advdet.attacks.registry import ATTACKS
from advdet.bench.failure_rates import DEFAULT_IOU, DEFAULT_SCORE_THRESH
from advdet.bench.loading import UntrainedModelError
from advdet.bench.pipeline import CraftedBatch, Crafter, DatasetsBySize, ModelSet, index_batches
from advdet.bench.runtime import release_memory, resolve_device
from advdet.bench.transfer_examples import add_relevance, clean_example_rows, record_examples
from advdet.bench.transfer_report import json_ready, transfer_report
from advdet.bench.transfer_rows import (NO_ATTACK, RowSpec, build_row_attack, ensemble_members, is_classifier_attack,
                                        plan_rows, sweep_values_of)
from advdet.bench.transfer_scores import RowResult
from advdet.bench.transfer_victims import VictimSet

log = logging.getLogger(__name__)

__all__ = ["transfer_matrix", "ModelUnavailable"]

#: the error of a model that cannot be loaded as asked (the loader's ``UntrainedModelError``)
ModelUnavailable = UntrainedModelError


# ------------------------------------------------------------------------------------------------- the parts
class _Progress:
    """A rich progress bar over the run's batches (nothing when disabled); ``advance(desc)`` one step."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total, self.bar, self.task = enabled, total, None, None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), transient=False).__enter__()
            self.task = self.bar.add_task("transfer", total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def advance(self, desc: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=desc)


def _say(msg: str, on_progress: Callable[[str], None] | None) -> None:
    log.info(msg)
    if on_progress is not None:
        on_progress(msg)


def _known_attacks(attacks: Sequence[str], skip_unavailable: bool, skipped: list[str]) -> list[str]:
    """The registered attacks of ``attacks`` (``gaussian``: the Ablation row); an unknown one raises
    ``KeyError``, or is noted in ``skipped`` with ``skip_unavailable``."""
    wanted = []
    for a in attacks:
        if a in ATTACKS or a == "gaussian":
            wanted.append(a)
        elif skip_unavailable:
            skipped.append(f"attack {a}: not registered (known: {', '.join(ATTACKS)})")
        else:
            raise KeyError(f"unknown attack {a!r}; registered: {', '.join(ATTACKS)}")
    return wanted


def _resolve_models(models: ModelSet, victims: Sequence[str], surrogates: Sequence[str], wanted: list[str],
                    classifier: str, leave_one_out: bool | Sequence[str]
                    ) -> tuple[list[str], list[str], list[str] | None, list[str]]:
    """Load the victims, surrogates, leave-one-out ensembles and classifier: (victims, surrogates,
    leave-one-out pool or None, attacks) that are available; attacks left without a surrogate are
    dropped with a note in ``models.skipped``."""
    victim_models = [v for v in dict.fromkeys(victims) if models.get(v) is not None]
    for v in victim_models:
        if models[v].kind != "detector":
            raise ValueError(f"victim {v!r} is not a detector")
    if not victim_models:
        raise ModelUnavailable("no victim model is available")
    sur_models = [s for s in dict.fromkeys(surrogates) if models.get(s) is not None]
    for s in sur_models:
        if models[s].kind != "detector":
            raise ValueError(f"surrogate {s!r} is not a detector (classifier attacks use `classifier=`)")
    loo_pool: list[str] | None = None
    if leave_one_out:
        loo_pool = list(victim_models) if leave_one_out is True else [m for m in dict.fromkeys(leave_one_out)
                                                                      if models.get(m) is not None]
        for h in loo_pool:
            if models.get("+".join(p for p in loo_pool if p != h)) is None:
                raise ModelUnavailable(f"leave-one-out: the ensemble without {h} cannot be loaded")
    if any(is_classifier_attack(a) for a in wanted) and models.get(classifier) is None:
        dropped = [a for a in wanted if is_classifier_attack(a)]
        models.skipped.append(f"attacks {', '.join(dropped)}: classifier {classifier!r} unavailable")
        wanted = [a for a in wanted if not is_classifier_attack(a)]
    if not sur_models and not loo_pool and any(not is_classifier_attack(a) and a != "gaussian" for a in wanted):
        dropped = [a for a in wanted if not is_classifier_attack(a) and a != "gaussian"]
        models.skipped.append(f"attacks {', '.join(dropped)}: no detector surrogate available")
        wanted = [a for a in wanted if is_classifier_attack(a) or a == "gaussian"]
    return victim_models, sur_models, loo_pool, wanted


def _clean_row(spec: RowSpec, victims: VictimSet, batches: list[list[int]], ex_store: list[dict], ds0,
               prog: _Progress) -> RowResult:
    """No Attack: every victim on the clean images at its own input size (the failure rates' reference)."""
    row = RowResult(spec)
    t0, c0 = time.perf_counter(), time.process_time()
    victims.start_row(0)
    for v in victims.names:
        for idx in batches:
            victims.clean(v, idx)
            prog.advance(f"{NO_ATTACK} · {v}")
    clean_example_rows(ex_store, ds0, victims.names, victims.clean_ref, victims.loaded)
    row.add_eval(time.perf_counter() - t0, time.process_time() - c0)
    return row


def _attack_row(ri: int, spec: RowSpec, crafted: Iterator[CraftedBatch], victims: VictimSet,
                ex_store: list[dict], prog: _Progress) -> RowResult:
    """One attack row: every crafted batch (``Crafter.batches``) predicted by every victim."""
    row = RowResult(spec)
    victims.start_row(ri)
    for b in crafted:
        row.add_crafted(b)
        te, ce = time.perf_counter(), time.process_time()
        preds, params_v = victims.attacked(ri, b)
        row.add_eval(time.perf_counter() - te, time.process_time() - ce)
        if b.indices[0] < len(ex_store):
            record_examples(ex_store, ri, b.indices, b.clean_u8, b.adv, b.params, preds, params_v, victims.names,
                            victims.score_thresh)
        del b, preds
        release_memory()
        prog.advance(spec.label)
    return row


# ------------------------------------------------------------------------------------------------- the benchmark
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
    skipped: list[str] = []
    notes: list[str] = []
    wanted = _known_attacks(attacks, skip_unavailable, skipped)
    model_set = ModelSet(device=dev, weights=weights, models=models, sizes=sizes, allow_untrained=allow_untrained,
                         skip_unavailable=skip_unavailable, skipped=skipped)
    victim_models, sur_models, loo_pool, wanted = _resolve_models(model_set, victims, surrogates, wanted, classifier,
                                                                  leave_one_out)
    loaded = model_set.loaded
    rows = plan_rows(sur_models, wanted, eps=eps, sweep=sweep, sweep_values=sweep_values, classifier=classifier,
                     attack_kwargs=attack_kwargs, registry=ATTACKS, notes=notes, leave_one_out=loo_pool)

    # ---- data (one letterboxed copy per input size; same image order in each; masks for mask victims)
    datasets = DatasetsBySize(data, ann, skip_bad=skip_bad, masks=True)
    crafting = list(dict.fromkeys(list(sur_models) + [r.surrogate for r in rows if r.kind == "detector"]))
    ref_size = loaded[crafting[0]].input_size if crafting else loaded[victim_models[0]].input_size
    ds0 = datasets[ref_size]
    n = len(ds0) if limit is None else min(int(limit), len(ds0))
    if n <= 0:
        raise ValueError(f"{data}: no images to evaluate")
    batches = index_batches(n, batch_size)
    image_ids = [int(ds0.image_ids[i]) for i in range(n)]
    det_surrogates = {m for s in crafting for m in ensemble_members(s)}
    victim_set = VictimSet(victim_models, loaded, datasets, dev, ds0.label_to_cat_id, score_thresh, iou)
    ex_store = [{"index": i, "image_id": image_ids[i], "rows": {}} for i in range(min(int(examples), n))]

    # ---- No Attack, then every other row: craft once (quantised), all victims
    with _Progress(progress, (len(victim_models) + len(rows) - 1) * len(batches)) as prog:
        _say(f"{NO_ATTACK}: {len(victim_models)} victims on {n} images", on_progress)
        results = [_clean_row(rows[0], victim_set, batches, ex_store, ds0, prog)]
        for ri, spec in enumerate(rows[1:], start=1):
            sur = loaded[spec.surrogate] if spec.surrogate is not None else None
            size = sur.input_size if sur is not None else ref_size
            atk = build_row_attack(spec, sur.model if sur is not None else None, seed, dev, ATTACKS)
            _say(f"{spec.label}: crafting on {spec.surrogate or '-'} ({n} images, {size}px)", on_progress)
            crafted = Crafter(atk, seed, dev).batches(datasets, size, batches, use_gt=use_gt)
            results.append(_attack_row(ri, spec, crafted, victim_set, ex_store, prog))

    # ---- relevance before / after on the surrogate (grid images)
    if relevance and ex_store:
        add_relevance(ex_store, rows, loaded, loaded[crafting[0]] if crafting else None, dev)

    # ---- scores
    cat_name_by_id = {c["id"]: c["name"] for c in ds0.categories}
    for ri, row in enumerate(results):
        row.metrics, row.failure = victim_set.scores(ri, ds0.coco_gt, image_ids, cat_name_by_id)
    row_out = [row.to_json(victim_models, det_surrogates) for row in results]
    boot, boot_samples = None, {}
    if n_boot:
        from advdet.bench.intervals import transfer_intervals

        _say(f"bootstrap: {n_boot} resamples of {n} images", on_progress)
        boot = transfer_intervals(row_out, victim_set.results, ds0.coco_gt, image_ids, victim_models, n_boot=n_boot,
                                  seed=boot_seed, level=ci_level, reference=paired_with, samples_out=boot_samples)
    eps_out = [float(e) for e in eps] if isinstance(eps, (list, tuple)) else float(eps)
    out = {
        "kind": "transfer", "data": str(data), "ann": None if ann is None else str(ann), "images": n,
        "image_ids": image_ids, "eps": eps_out, "seed": seed, "batch_size": batch_size,
        "score_thresh": score_thresh, "iou": iou, "surrogates": sur_models, "classifier": classifier,
        "victims": victim_models, "attacks": wanted, "leave_one_out": loo_pool,
        "sweep": None if not any(r.sweep for r in rows) else {"name": next(r.sweep for r in rows if r.sweep),
                                                              "values": sweep_values_of(rows)},
        "models": {k: m.info() for k, m in loaded.items()}, "class_names": [c["name"] for c in ds0.categories],
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
