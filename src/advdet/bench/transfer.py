"""The transfer benchmark of RAD section 4 (Tables 1-4, 7, 8; Fig. 7): craft adversarial images once per
(surrogate, attack), evaluate every victim on them.

Rows (RAD Table 3): ``No Attack`` (the clean images), ``Ablation`` (Gaussian noise, sigma = 9 in 0-255
units, RAD sec. 4.1) and one row per attack (and per sweep value). Columns: the victims. Cells: COCO box
mAP@[.5:.95] (also mAP50 and mAP75; segmentation mAP for mask models, Table 4). Per row:

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

Classifier attacks (registered with ``classifier=True``: cls-pgd, cls-si-pgd, cls-mi-di-pgd,
cls-mi-ti-pgd) are crafted on the zoo ``classifier`` (``classifier=`` to change it), once, whatever the
detector surrogates.

Sweeps (one at a time):

- ``eps=[4, 8, 12, 16]``: every attack at every eps (RAD Fig. 7);
- ``sweep="nodes"``: values ``static:M`` / ``dynamic:T`` (RAD Table 7; attacks with a ``nodes`` parameter);
- ``sweep="technique"``: ``none``, ``DI``, ``TI``, ``SI``, ``MI`` or combinations ``SI+MI`` (RAD Table 2;
  attacks with a ``transforms`` parameter);
- ``sweep="node_type"``: ``cls``, ``loc``, ``size`` (RAD Table 1; attacks with a ``node_type`` parameter).

An attack without the swept parameter runs once, with a note. Seeds: attack ``seed + index of the batch's
first image``, so the same call gives the same numbers.

Ensembles (issue 24, item 1): a surrogate named ``a+b+c`` is ONE surrogate, the members' ensemble
(``advdet.attacks.ensemble``: every attack averages its objective over the members at every step); its
black-box victims are the victims that are not members. ``leave_one_out=True`` (or a list of models, the
pool; ``True``: the victims) adds, per detector attack, one row per pool model ``h``: the attack crafted
on the ensemble of the other pool models, labelled ``ens-<attack> without <h>``; its black-box number is
``h`` alone (``held_out``).
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advdet.attacks.base import letterbox_mask
from advdet.attacks.quantize import quantize_adv, to_uint8
from advdet.attacks.registry import ATTACKS
from advdet.bench.failure_rates import DEFAULT_IOU, DEFAULT_SCORE_THRESH, FailureCounter, threshold_detections
from advdet.attacks.ensemble import is_ensemble_name
from advdet.bench.loading import LoadedModel, UntrainedModelError, load_ensemble, load_model
from advdet.bench.runtime import release_memory, resolve_device
from advdet.data.collate import collate_detection
from advdet.data.errors import UnknownNameError
from advdet.data.letterbox import LetterboxParams, letterbox_params, unletterbox_boxes
from advdet.metrics.coco_map import coco_map
from advdet.metrics.perturbation import perturbation_stats
from advdet.models.evaluate import predictions_to_coco

log = logging.getLogger(__name__)

__all__ = ["transfer_matrix", "load_model", "LoadedModel", "ModelUnavailable",
           "RowSpec", "plan_rows", "transforms_for", "reletterbox", "json_ready", "transfer_table",
           "transfer_report", "SWEEPS", "DEFAULT_SWEEP_VALUES", "NO_ATTACK", "ABLATION", "ensemble_members",
           "leave_one_out_label"]

NO_ATTACK, ABLATION = "No Attack", "Ablation"
SWEEPS = ("eps", "nodes", "technique", "node_type")
DEFAULT_SWEEP_VALUES: dict[str, list] = {
    "eps": [4.0, 8.0, 12.0, 16.0],
    "nodes": ["dynamic:-1", "dynamic:-2", "dynamic:-3", "static:10", "static:20", "static:30"],
    "technique": ["none", "DI", "TI", "SI", "MI"],
    "node_type": ["size", "loc", "cls"],
}
#: the keyword each sweep sets on an attack (its presence in the attack's signature decides)
_SWEEP_PARAM = {"eps": "eps", "nodes": "nodes", "technique": "transforms", "node_type": "node_type"}


#: the error of a model that cannot be loaded as asked (the loader's ``UntrainedModelError``)
ModelUnavailable = UntrainedModelError


def _is_classifier_attack(name: str) -> bool:
    from advdet.attacks.registry import CLASSIFIER_ATTACKS

    return name in CLASSIFIER_ATTACKS


def _accepts(cls: type, param: str) -> bool:
    sig = inspect.signature(cls.__init__)
    return param in sig.parameters or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def transforms_for(technique: str) -> list:
    """Fresh transform instances for an update technique name (``none``, ``SI``, ``DI``, ``TI``, ``MI`` or
    ``+``-joined combinations such as ``SI+MI``); RAD Table 2 settings are the transforms' defaults."""
    from advdet.attacks.transforms import DI, MI, SI, TI

    table = {"SI": SI, "DI": DI, "TI": TI, "MI": MI}
    name = str(technique).strip()
    if name.lower() in ("none", ""):
        return []
    out = []
    for part in name.split("+"):
        key = part.strip().upper()
        if key not in table:
            raise ValueError(f"unknown update technique {part!r}; choose from none, SI, DI, TI, MI (or SI+MI ...)")
        out.append(table[key]())
    return out


def _sweep_kwargs(sweep: str, value: Any) -> dict:
    if sweep == "eps":
        return {"eps": float(value)}
    if sweep == "technique":
        return {"technique": str(value)}
    if sweep == "node_type":
        if value not in ("cls", "loc", "size"):
            raise ValueError(f"node_type sweep values are cls, loc, size; got {value!r}")
        return {"node_type": value}
    if sweep == "nodes":
        kind, _, param = str(value).partition(":")
        if kind not in ("static", "dynamic") or not param:
            raise ValueError(f"nodes sweep values look like static:20 or dynamic:-1; got {value!r}")
        return {"nodes": "static", "m": int(param)} if kind == "static" else {"nodes": "dynamic",
                                                                               "threshold": float(param)}
    raise ValueError(f"unknown sweep {sweep!r}; choose one of {', '.join(SWEEPS)}")


# ------------------------------------------------------------------------------------------------- rows
@dataclass
class RowSpec:
    """One row of the table: which attack, crafted on which model, with which settings."""

    label: str
    attack: str | None                 # registry name; None for No Attack
    kind: str                          # "reference" | "classifier" | "detector"
    surrogate: str | None              # crafting model (None: no model)
    kwargs: dict = field(default_factory=dict)
    sweep: str | None = None
    sweep_value: Any = None
    held_out: str | None = None        # leave-one-out rows: the victim left out of the ensemble


def ensemble_members(surrogate: str | None) -> list[str]:
    """The models a surrogate is made of: ``a+b`` -> [a, b]; ``a`` -> [a]; None -> []."""
    if surrogate is None:
        return []
    from advdet.attacks.ensemble import parse_ensemble

    return parse_ensemble(surrogate)


def leave_one_out_label(attack: str, held_out: str) -> str:
    """The label of a leave-one-out row: ``ens-<attack> without <held_out>``."""
    return f"ens-{attack} without {held_out}"


def plan_rows(surrogates: Sequence[str], attacks: Sequence[str], *, eps: float | Sequence[float] = 16.0,
              sweep: str | None = None, sweep_values: Sequence | None = None, classifier: str = "classifier",
              attack_kwargs: Mapping[str, dict] | None = None, registry: Mapping[str, type] | None = None,
              notes: list[str] | None = None, leave_one_out: Sequence[str] | None = None) -> list[RowSpec]:
    """The rows of a transfer table (see the module docstring), in display order: No Attack, Ablation,
    then the attacks in the given order (classifier attacks once; detector attacks once per surrogate,
    then, with ``leave_one_out`` (the pool of models), once per pool model ``h`` on the ensemble of the
    other pool models, ``held_out=h``), each expanded over the sweep values. Unknown attack names raise
    ``KeyError``."""
    registry = registry if registry is not None else ATTACKS
    notes = notes if notes is not None else []
    attack_kwargs = dict(attack_kwargs or {})
    eps_list = [float(e) for e in eps] if isinstance(eps, (list, tuple)) else [float(eps)]
    if len(eps_list) > 1:
        if sweep not in (None, "eps"):
            raise ValueError("one sweep at a time: an eps list is the eps sweep; drop the other sweep")
        sweep, sweep_values = "eps", eps_list
    elif sweep == "eps":
        sweep_values = [float(v) for v in (sweep_values or DEFAULT_SWEEP_VALUES["eps"])]
    elif sweep is not None:
        if sweep not in SWEEPS:
            raise ValueError(f"unknown sweep {sweep!r}; choose one of {', '.join(SWEEPS)}")
        sweep_values = list(sweep_values or DEFAULT_SWEEP_VALUES[sweep])
    base_eps = eps_list[0]
    rows = [RowSpec(NO_ATTACK, None, "reference", None),
            RowSpec(ABLATION, "gaussian", "reference", None, dict(attack_kwargs.get("gaussian", {})))]
    multi = len(surrogates) > 1
    pool = list(dict.fromkeys(leave_one_out or []))
    if leave_one_out is not None and len(pool) < 2:
        raise ValueError(f"leave-one-out needs at least two models in its pool, got {pool}")
    for name in attacks:
        if name == "gaussian":
            continue  # the Ablation row
        if name not in registry:
            raise UnknownNameError(f"unknown attack {name!r}; registered: {', '.join(registry)}")
        cls = registry[name]
        user = dict(attack_kwargs.get(name, {}))
        is_cls = _is_classifier_attack(name)
        crafters = [(classifier, name, None)] if is_cls else \
            [(sur, name if not multi else f"{name} ({sur})", None) for sur in surrogates]
        if not is_cls:
            crafters += [("+".join(p for p in pool if p != h), leave_one_out_label(name, h), h) for h in pool]
        for sur, label, held in crafters:
            base = dict(user)
            if "eps" not in base and _accepts(cls, "eps"):
                base["eps"] = base_eps
            values: list = [None]
            if sweep is not None:
                if _accepts(cls, _SWEEP_PARAM[sweep]):
                    values = list(sweep_values)
                else:
                    notes.append(f"{name}: no {_SWEEP_PARAM[sweep]!r} parameter, run once without the {sweep} sweep")
            for v in values:
                kw = dict(base)
                row_label = label
                if v is not None:
                    kw.update(_sweep_kwargs(sweep, v))
                    row_label = f"{label} eps={float(v):g}" if sweep == "eps" else f"{label} [{v}]"
                rows.append(RowSpec(row_label, name, "classifier" if is_cls else "detector", sur, kw,
                                    sweep if v is not None else None, v, held))
    return rows


def _build_attack(spec: RowSpec, model: nn.Module | None, seed: int, device, registry) -> Any:
    cls = registry[spec.attack]
    kw = dict(spec.kwargs)
    if "technique" in kw:
        kw["transforms"] = transforms_for(kw.pop("technique"))
    for key, val in (("valid_only", True), ("seed", seed)):
        if key not in kw and _accepts(cls, key):
            kw[key] = val
    if device is not None and "device" not in kw and _accepts(cls, "device"):
        kw["device"] = device
    from advdet.attacks.ensemble import ENSEMBLE_OPTIONS, SurrogateEnsemble
    from advdet.attacks.registry import build_attack

    if (spec.kind == "detector" and model is not None and not isinstance(model, SurrogateEnsemble)
            and any(k in kw for k in ENSEMBLE_OPTIONS) and not any(_accepts(cls, k) for k in ENSEMBLE_OPTIONS)):
        model = SurrogateEnsemble([model], [spec.surrogate])  # ensemble options: a one-member ensemble

    return build_attack(spec.attack, model, **kw)


# ------------------------------------------------------------------------------------------------- images
def reletterbox(images_u8: torch.Tensor, params: Sequence[LetterboxParams], size: int) -> tuple[torch.Tensor, list]:
    """Letterboxed uint8 canvases (B, 3, S, S) -> float canvases (B, 3, size, size) in [0, 1] for a model of
    another input size: the image content is cut out, resized (bilinear, antialiased) to the content size
    of a ``size`` letterbox of the original image, and placed on a zero canvas. Returns the canvases and
    their ``LetterboxParams`` (relative to the original image, for mapping predictions back)."""
    b = images_u8.shape[0]
    out = torch.zeros((b, 3, size, size), dtype=torch.float32, device=images_u8.device)
    new_params = []
    for i, p in enumerate(params):
        nh, nw = p.content_hw
        crop = images_u8[i:i + 1, :, p.pad_y:p.pad_y + nh, p.pad_x:p.pad_x + nw].float() / 255.0
        q = letterbox_params(p.orig_h, p.orig_w, size)
        th, tw = q.content_hw
        if (th, tw) != (nh, nw):
            crop = F.interpolate(crop, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
        out[i, :, q.pad_y:q.pad_y + th, q.pad_x:q.pad_x + tw] = crop[0].clamp(0, 1)
        new_params.append(q)
    return out, new_params


def _to_hwc(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().permute(1, 2, 0).numpy())


# ------------------------------------------------------------------------------------------------- the benchmark
def _make_progress(progress: bool):
    if not progress:
        return nullcontext(None)
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), transient=False)


def _mean(vals: Sequence[float | None]) -> float | None:
    v = [x for x in vals if x is not None and x >= 0]
    return float(sum(v) / len(v)) if v else None


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
    from advdet.data.registry import build_dataset

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
    if any(_is_classifier_attack(a) for a in wanted) and get(classifier) is None:
        dropped = [a for a in wanted if _is_classifier_attack(a)]
        skipped.append(f"attacks {', '.join(dropped)}: classifier {classifier!r} unavailable")
        wanted = [a for a in wanted if not _is_classifier_attack(a)]
    if not sur_models and not loo_pool and any(not _is_classifier_attack(a) and a != "gaussian" for a in wanted):
        dropped = [a for a in wanted if not _is_classifier_attack(a) and a != "gaussian"]
        skipped.append(f"attacks {', '.join(dropped)}: no detector surrogate available")
        wanted = [a for a in wanted if _is_classifier_attack(a) or a == "gaussian"]

    rows = plan_rows(sur_models, wanted, eps=eps, sweep=sweep, sweep_values=sweep_values, classifier=classifier,
                     attack_kwargs=attack_kwargs, registry=registry, notes=notes, leave_one_out=loo_pool)

    # ---- data (one letterboxed copy per input size; same image order in each)
    datasets: dict[int, Any] = {}

    def ds_at(size: int):
        if size not in datasets:
            datasets[size] = build_dataset(data, ann, size=size, skip_bad=skip_bad)
        return datasets[size]

    crafters = list(dict.fromkeys(list(sur_models) + [r.surrogate for r in rows if r.kind == "detector"]))
    ref_size = loaded[crafters[0]].input_size if crafters else loaded[victim_models[0]].input_size
    ds0 = ds_at(ref_size)
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

    def batch_at(size: int, idx: list[int]):
        return collate_detection([ds_at(size)[i] for i in idx])

    # per row and victim: COCO results; per victim: clean thresholded predictions (failure-rate reference)
    results: dict[tuple[int, str], list] = {}
    clean_ref: dict[str, list[dict]] = {v: [] for v in victim_models}
    failure: dict[tuple[int, str], FailureCounter] = {}
    ex_store: list[dict] = [{"index": i, "image_id": image_ids[i], "rows": {}} for i in range(n_examples)]
    row_out: list[dict] = []

    @torch.no_grad()
    def predict(v: str, x: torch.Tensor) -> list[dict]:
        return loaded[v].model.predict(x.to(dev))

    def record_examples(ri: int, idx: list[int], clean_u8: torch.Tensor, adv_u8: torch.Tensor, params: list,
                        preds: dict[str, list[dict]], params_v: dict[str, list]) -> None:
        for j, i in enumerate(idx):
            if i >= n_examples:
                continue
            entry = {"clean": _to_hwc(clean_u8[j]), "adv": _to_hwc(adv_u8[j]), "params": params[j], "preds": {}}
            for v in victim_models:
                d = threshold_detections(preds[v][j], score_thresh)
                d["boxes"] = unletterbox_boxes(d["boxes"], params_v[v][j])
                entry["preds"][v] = d
            ex_store[i]["rows"][ri] = entry

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
                x, targets = batch_at(loaded[v].input_size, idx)
                outs = predict(v, x)
                results[(0, v)] += predictions_to_coco(outs, targets, ds0.label_to_cat_id)
                for o in outs:
                    c = threshold_detections(o, score_thresh)
                    clean_ref[v].append(c)
                    failure[(0, v)].update(c, c, thresholded=True)
                advance(f"{NO_ATTACK} · {v}")
        # the example grid's clean row: the clean image at the reference size with every victim's clean boxes
        for ex in ex_store:
            item = ds0[ex["index"]]
            u8 = _to_hwc(to_uint8(item["image"]))
            p = item["letterbox"]
            entry = {"clean": u8, "adv": u8, "params": p, "preds": {}}
            for v in victim_models:
                d = clean_ref[v][ex["index"]]
                p_v = letterbox_params(p.orig_h, p.orig_w, loaded[v].input_size)
                entry["preds"][v] = {**d, "boxes": unletterbox_boxes(d["boxes"], p_v)}
            ex["rows"][0] = entry
        row_seconds = {0: {"craft": 0.0, "eval": time.perf_counter() - t0, "craft_cpu": 0.0,
                           "eval_cpu": time.process_time() - c0}}
        pert: dict[int, dict] = {0: {"rmse": 0.0, "linf": 0.0, "linf_max": 0.0}}

        # ---- every other row: craft once, quantise, all victims
        for ri, spec in enumerate(rows[1:], start=1):
            crafter = loaded[spec.surrogate] if spec.surrogate is not None else None
            size = crafter.input_size if crafter is not None else ref_size
            atk = _build_attack(spec, crafter.model if crafter is not None else None, seed, dev, registry)
            say(f"{spec.label}: crafting on {spec.surrogate or '-'} ({n} images, {size}px)")
            t_craft = t_eval = c_craft = c_eval = 0.0
            rmse, linf = [], []
            for v in victim_models:
                results[(ri, v)] = []
                failure[(ri, v)] = FailureCounter(score_thresh, iou)
            for idx in batches:
                x, targets = batch_at(size, idx)
                params = [t["letterbox"] for t in targets]
                mask = letterbox_mask(params, size, size)
                tc, cc = time.perf_counter(), time.process_time()
                atk.manual_seed(seed + idx[0])
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
                    record_examples(ri, idx, clean_u8, q, params, preds, params_v)
                del x_adv, preds
                release_memory()
                advance(spec.label)
            row_seconds[ri] = {"craft": t_craft, "eval": t_eval, "craft_cpu": c_craft, "eval_cpu": c_eval}
            pert[ri] = {"rmse": float(np.mean(rmse)), "linf": float(np.mean(linf)), "linf_max": float(np.max(linf))}

    # ---- relevance before / after on the surrogate (grid images)
    if relevance and n_examples:
        _add_relevance(ex_store, rows, loaded, rel_model, dev)

    # ---- scores
    for ri, spec in enumerate(rows):
        metrics, fail = {}, {}
        for v in victim_models:
            m = coco_map(gt, results[(ri, v)], "bbox", image_ids=image_ids, per_class=True)
            apc = {cat_name_by_id[k]: val for k, val in m.pop("ap_per_class").items()}
            m["ap_per_class"] = apc
            if loaded[v].has_masks:
                segm = coco_map(gt, [r for r in results[(ri, v)] if "segmentation" in r], "segm", image_ids=image_ids)
                m.update({f"segm_{k}": val for k, val in segm.items()})
            metrics[v] = m
            fail[v] = failure[(ri, v)].rates()
        if spec.kind == "detector" and spec.held_out is not None:
            bb = [spec.held_out]  # leave-one-out: the held-out victim alone
        elif spec.kind == "detector":
            members = ensemble_members(spec.surrogate)
            bb = [v for v in victim_models if v not in members]
        else:
            bb = [v for v in victim_models if v not in det_surrogates] or list(victim_models)
        black = {"victims": bb}
        for key in ("map", "map50", "map75"):
            black[key] = _mean([metrics[v][key] for v in bb])
        white = None
        if spec.kind == "detector" and spec.surrogate in metrics:
            white = {"victim": spec.surrogate, **{k: metrics[spec.surrogate][k] for k in ("map", "map50", "map75")}}
        settings = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
                    for k, v in spec.kwargs.items()}
        row_out.append({"label": spec.label, "attack": spec.attack, "kind": spec.kind, "surrogate": spec.surrogate,
                        "held_out": spec.held_out,
                        "sweep": spec.sweep, "sweep_value": spec.sweep_value, "settings": settings,
                        "metrics": metrics, "black_box": black, "white_box": white, "perturbation": pert[ri],
                        "failure": fail, "seconds": {k: round(v, 3) for k, v in row_seconds[ri].items()},
                        "diagnostics": diagnostics[ri].as_dict() if ri in diagnostics else None})

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
                                                              "values": _sweep_values(rows)},
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


def _sweep_values(rows: Sequence[RowSpec]) -> list:
    vals = []
    for r in rows:
        if r.sweep and r.sweep_value not in vals:
            vals.append(r.sweep_value)
    return vals


def _add_relevance(ex_store: list[dict], rows: Sequence[RowSpec], loaded: dict, rel_model: LoadedModel | None,
                   dev) -> None:
    """Relevance maps (Multi-Node SGLRP, default top-20 cls nodes) of every example image of every row, on
    the row's detector surrogate (reference and classifier rows: the first detector surrogate)."""
    try:
        from advdet.relevance.sglrp import relevance_map
    except ImportError as err:  # pragma: no cover
        log.warning("relevance maps unavailable: %s", err)
        return
    for ex in ex_store:
        for ri, entry in ex["rows"].items():
            spec = rows[ri]
            lm = loaded.get(spec.surrogate) if spec.kind == "detector" else rel_model
            lm = getattr(lm, "members", [lm])[0]  # an ensemble: its first member's relevance
            if lm is None or lm.kind != "detector":
                continue
            try:
                imgs = [entry["clean"], entry["adv"]]
                x = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255.0 for a in imgs])
                if x.shape[-1] != lm.input_size:
                    x, _ = reletterbox(to_uint8(x), [entry["params"]] * 2, lm.input_size)
                res = relevance_map(lm.model, x.to(dev))
                entry["relevance"] = {"model": lm.name, "before": res.map[0].detach().cpu().numpy(),
                                      "after": res.map[1].detach().cpu().numpy()}
            except Exception as err:  # relevance is an illustration; never fail the benchmark for it
                log.warning("relevance map of %s on %s failed: %s", spec.label, lm.name, err)


# ------------------------------------------------------------------------------------------------- output
def json_ready(result: dict) -> dict:
    """The result without its private keys (``_examples``, ``_row_specs``, ``_bootstrap_samples``), ready for
    ``json.dump``."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, (np.floating, np.integer)):
            return v.item()
        return v
    return clean({k: v for k, v in result.items() if not k.startswith("_")})


def transfer_table(result: dict, metric: str = "map", scale: float = 100.0) -> tuple[list[str], list[list]]:
    """(columns, rows) of the RAD Table 3 layout: attack, one column per victim (``metric`` x ``scale``,
    the white-box cell marked ``*``), mean black-box, RMSE."""
    victims = result["victims"]
    cols = ["attack"] + victims + ["black-box mean", "RMSE"]
    rows = []
    for r in result["rows"]:
        cells: list = [r["label"]]
        for v in victims:
            val = r["metrics"][v].get(metric)
            cells.append(None if val is None or val < 0 else val * scale)
        bb = r["black_box"].get(metric) if metric in ("map", "map50", "map75") else \
            _mean([r["metrics"][v].get(metric) for v in r["black_box"]["victims"]])
        cells.append(None if bb is None else bb * scale)
        cells.append(r["perturbation"]["rmse"])
        rows.append(cells)
    return cols, rows


def transfer_report(result: dict, title: str | None = None):
    """A :class:`~advdet.bench.report.Report` of a ``transfer_matrix`` result: settings, the tables (box
    mAP, mAP50, mAP75, segm mAP for mask victims, failure rates), figures (mAP vs eps per victim when
    sweeping eps, attack x victim and surrogate x victim heat maps, per-class AP bars) and image grids
    (clean / adversarial image with each victim's boxes, perturbation x5, relevance before / after)."""
    from advdet.bench import plots
    from advdet.bench.report import Report

    victims, rows = result["victims"], result["rows"]
    names = result.get("class_names") or []
    rep = Report(title or f"Transfer benchmark on {result['data']}", float_format="{:.1f}")
    eps = result["eps"]
    rep.add_text("\n".join([
        f"Adversarial images crafted on **{', '.join(result['surrogates']) or '-'}** (detection attacks) and "
        f"**{result['classifier']}** (classifier attacks), evaluated on **{result['images']}** images of "
        f"`{result['data']}` by every victim. eps = {eps} (Linf, 0-255), seed {result['seed']}, device "
        f"{result['device']}, {result['seconds']:.0f} s.",
        "",
        "Cells are COCO mAP x 100 (RAD Table 3 layout); `*` marks the white-box cell. Ablation = Gaussian "
        "noise, sigma 9. RMSE: mean per-image RMSE (0-255) of the saved perturbation.",
    ]))
    for line in result.get("skipped", []):
        rep.add_text(f"- skipped: {line}")
    for metric, what in (("map", "box mAP"), ("map50", "box mAP50"), ("map75", "box mAP75")):
        cols, table = transfer_table(result, metric)
        table = _mark_white_box(result, table)
        rep.add_table(f"Transfer: {what} (x100)", cols, table,
                      note="black-box mean: victims other than the row's surrogate")
    _add_interval_tables(rep, result)
    mask_victims = [v for v in victims if "segm_map" in rows[0]["metrics"][v]]
    if mask_victims:
        cols = ["attack"] + [f"{v} {k}" for k in ("mAP", "mAP50", "mAP75") for v in mask_victims]
        table = [[r["label"]] + [_pct(r["metrics"][v].get(f"segm_{k}")) for k in ("map", "map50", "map75")
                                 for v in mask_victims] for r in rows]
        rep.add_table("Segmentation mAP (x100, RAD Table 4)", cols, table)
    # failure rates
    cols = ["attack"] + [f"{v} {k}" for v in victims for k in ("gone %", "mislab %", "new/img")]
    table = []
    for r in rows[1:]:
        cells: list = [r["label"]]
        for v in victims:
            f = r["failure"][v]
            cells += [_pct(f["disappearance"]), _pct(f["misclassification"]), f["hallucination"]]
        table.append(cells)
    rep.add_table("Failure rates against the clean predictions", cols, table,
                  note=f"score >= {result['score_thresh']}, IoU >= {result['iou']}: gone = disappearance, "
                       "mislab = misclassification (% of clean detections), new/img = hallucinated boxes per image")
    # perturbation and timing
    rep.add_table("Perturbation and time",
                  ["attack", "surrogate", "RMSE", "mean Linf", "max Linf", "craft s", "eval s"],
                  [[r["label"], r["surrogate"] or "-", r["perturbation"]["rmse"], r["perturbation"]["linf"],
                    r["perturbation"]["linf_max"], r["seconds"]["craft"], r["seconds"]["eval"]] for r in rows])
    diag_rows = [r for r in rows if r.get("diagnostics")]
    if diag_rows:
        def _rel(d):
            rel = d["relevance_per_iteration"]
            return f"{rel[0]:.3g} -> {rel[-1]:.3g}" if rel else "-"

        rep.add_table("RAD diagnostics", ["attack", "surrogate", "gradient evaluations", "second-term share %",
                                          "mean positive relevance (first -> last iteration)",
                                          "mean |delta|", "at +-eps %"],
                      [[r["label"], r["surrogate"] or "-", r["diagnostics"]["gradient_evaluations"],
                        _pct(r["diagnostics"]["second_term_share"]), _rel(r["diagnostics"]),
                        r["diagnostics"]["mean_abs_delta"], _pct(r["diagnostics"]["share_at_eps"])]
                       for r in diag_rows],
                      note="second-term share: (image, gradient evaluation) pairs whose relevance map had no "
                           "positive value, so the step came from RAD's second loss term alone (docs/rad.md)")
    # figures
    if result.get("sweep") and result["sweep"]["name"] == "eps":
        base = rows[0]
        by_attack: dict[str, list[dict]] = {}
        for r in rows:
            if r["sweep"] == "eps":
                key = r["label"].rsplit(" eps=", 1)[0]
                by_attack.setdefault(key, []).append(r)
        for key, rs in by_attack.items():
            rs = sorted(rs, key=lambda r: float(r["sweep_value"]))
            fig = plots.eps_curve_figure([float(r["sweep_value"]) for r in rs],
                                         {v: [r["metrics"][v]["map"] for r in rs] for v in victims},
                                         f"{key}: box mAP vs eps (RAD Fig. 7)",
                                         reference={v: base["metrics"][v]["map"] for v in victims})
            rep.add_figure(f"{key}: mAP against eps", fig)
    fig = plots.heatmap_figure([[r["metrics"][v]["map"] for v in victims] for r in rows], [r["label"] for r in rows],
                               victims, "box mAP x100: attack x victim")
    rep.add_figure("Attack x victim heat map", fig)
    if len(result["surrogates"]) > 1:
        for attack in dict.fromkeys(r["attack"] for r in rows if r["kind"] == "detector"):
            rs = [r for r in rows if r["attack"] == attack and r["kind"] == "detector" and r["sweep"] is None]
            if len(rs) > 1:
                fig = plots.heatmap_figure([[r["metrics"][v]["map"] for v in victims] for r in rs],
                                           [r["surrogate"] for r in rs], victims,
                                           f"{attack}: box mAP x100, surrogate x victim (RAD Table 8)")
                rep.add_figure(f"{attack}: surrogate x victim", fig)
    if names:
        for v in victims:
            series = {r["label"]: [r["metrics"][v]["ap_per_class"].get(c) for c in names] for r in rows}
            rep.add_figure(f"Per-class AP of {v}", plots.per_class_ap_figure(names, series, f"{v}: per-class AP"))
    _add_grids(rep, result, names)
    return rep


def _add_interval_tables(rep, result: dict) -> None:
    """The bootstrap intervals of mAP50 and the paired differences (``advdet.bench.intervals``), if any."""
    from advdet.bench.intervals import interval_note, transfer_interval_table, transfer_paired_table

    table = transfer_interval_table(result)
    if table is None:
        return
    note = interval_note(result["bootstrap"])
    rep.add_table("Transfer: box mAP50 (x100) with bootstrap intervals", *table, note=note)
    paired = transfer_paired_table(result)
    if paired is not None:
        rep.add_table(f"Paired: {result['bootstrap']['reference']} minus each baseline, box mAP50 (x100)", *paired,
                      note=note + "; both rows on the same resamples; black-box mean over the "
                           f"{result['bootstrap']['reference']} row's black-box victims; negative: lower mAP50 "
                           f"than the baseline")


def _pct(v):
    return None if v is None or (isinstance(v, float) and v < 0) else v * 100.0


def _mark_white_box(result: dict, table: list[list]) -> list[list]:
    victims = result["victims"]
    out = []
    for r, cells in zip(result["rows"], table):
        cells = list(cells)
        if r["white_box"] is not None:
            j = 1 + victims.index(r["white_box"]["victim"])
            if cells[j] is not None:
                cells[j] = f"{cells[j]:.1f}*"
        out.append(cells)
    return out


def _add_grids(rep, result: dict, names: list[str]) -> None:
    """One grid per example image: rows = table rows; columns = the (adversarial) image, perturbation x5,
    relevance on the surrogate, then the image with each victim's detections."""
    from PIL import Image

    from advdet.bench import plots
    from advdet.data.letterbox import letterbox_boxes

    rows, victims = result["rows"], result["victims"]
    for ex in result.get("_examples", []):
        grid, labels = [], []
        for ri, r in enumerate(rows):
            e = ex["rows"].get(ri)
            if e is None:
                continue
            h, w = e["adv"].shape[:2]
            p = e["params"]
            line = [e["adv"], plots.perturbation_image(e["clean"], e["adv"], 5.0)]
            rel = e.get("relevance")
            if rel is not None:
                line.append(plots.relevance_image(rel["after"] if ri else rel["before"]))
                if line[-1].shape[:2] != (h, w):
                    line[-1] = np.asarray(Image.fromarray(line[-1]).resize((w, h)))
            else:
                line.append(plots.placeholder_image(h, w, "no relevance"))
            for v in victims:
                d = e["preds"].get(v)
                if d is None:
                    line.append(plots.placeholder_image(h, w))
                    continue
                boxes = letterbox_boxes(d["boxes"], p)
                line.append(plots.draw_detections(e["adv"], boxes, d["labels"], d["scores"], names))
            grid.append(line)
            labels.append(r["label"])
        if grid:
            rel_names = {e.get("relevance", {}).get("model") for e in ex["rows"].values() if e.get("relevance")}
            rel_col = f"relevance ({', '.join(sorted(x for x in rel_names if x))})" if rel_names else "relevance"
            rep.add_image_grid(f"Image {ex['image_id']}: each row's image and every victim's detections",
                               grid, labels, ["image", "perturbation x5", rel_col] + victims)
