"""``advdet reproduce rad|robustdet``: regenerate the analogues of both papers' tables from the shipped zoo,
resumably, with a verdict per claim computed from bootstrap intervals.

A reproduction is a list of **steps**; each step is one benchmark call (``transfer_matrix``,
``robustness_table`` or ``robustness_steps_sweep``) whose result is written atomically to
``OUT/<target>/<step>.json`` and skipped when that file is present, so a killed run resumes at the first
missing step and a finished step is never computed (or lost) again. A step file made with other settings
(images, seed, resamples, weights, ...) is never overwritten: the run stops with an error naming it.

RAD (surrogate ``yolov3``, every zoo detector a victim, eps 16, ``shapes-val``):

- ``table3``: every attack (RAD, DAG, Dfool, Loc/Size, OSFD, the four classifier attacks) with No Attack
  and the Gaussian Ablation; it also gives Table 4 (segmentation mAP of maskrcnn) and Table 5 (RMSE);
- ``table1_node_type``: RAD with ``loc`` and ``size`` nodes (``cls``, RAD's default, is Table 3's row);
- ``table2_technique``: RAD with no update technique, DI and TI (SI, RAD's default, is Table 3's row);
- ``fig7_eps``: RAD at eps 4, 8, 12 (eps 16 is Table 3's row).

RobustDet (the zoo ``ssd_vgg`` and the six robust entries, eps 8):

- ``table1``: clean, A_cls, A_loc, CWA and RobustDet's DAG for every entry;
- ``fig7_steps``: A_cls and A_loc against the number of PGD steps (Fig. 7a/b).

**Verdicts.** A claim is a statistic compared with a threshold. Its interval is the 95 % percentile
interval of the statistic computed **on each bootstrap resample** of the images (the resamples the benchmark
drew; ratios are taken resample by resample, never as a ratio of intervals). :func:`verdict`: a claim
"statistic >= t" **holds** when the whole interval is at or above t, **fails** when it is entirely below t
and is **undecided** when the interval crosses t (or is undefined). A claim over several parts ("every
baseline", "every victim") holds when every part holds, fails when any part fails, else is undecided
(:func:`combine`).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from advdet.data.errors import AdvdetError
from advdet.metrics.bootstrap import DEFAULT_LEVEL, interval

log = logging.getLogger(__name__)

__all__ = ["HOLDS", "FAILS", "UNDECIDED", "TARGETS", "Step", "StaleStepError", "verdict", "combine",
           "ratio_samples", "reduction_interval", "difference_interval", "mean_samples", "rad_claims",
           "rad_goal", "robustdet_claims", "rad_steps", "robustdet_steps", "reproduce", "reproduce_command",
           "DEFAULT_LIMITS", "RAD_SURROGATE", "RAD_VICTIMS", "RAD_TABLE3_ATTACKS", "ROBUST_MODELS"]

HOLDS, FAILS, UNDECIDED = "holds", "fails", "undecided"
TARGETS = ("rad", "robustdet")
FORMAT = 1

#: RAD's surrogate, victims and Table 3 attacks (RAD sec. 4.1: eps 16, step 2, 10 iterations)
RAD_SURROGATE = "yolov3"
RAD_VICTIMS = ("yolov3", "ssd_vgg", "retinanet", "fcos", "fasterrcnn", "maskrcnn")
RAD_TABLE3_ATTACKS = ("rad", "dag-eps", "dfool", "loc-shift", "size", "osfd", "cls-pgd", "cls-si-pgd",
                      "cls-mi-di-pgd", "cls-mi-ti-pgd")
RAD_EPS = 16.0
#: RAD computes two images per relevance graph (as fast as the batch graph, half its memory; the demo's)
RAD_ATTACK_KWARGS = {"rad": {"micro_batch": 2}}
#: the sweeps' values that are not Table 3's RAD row (whose defaults are cls nodes, SI, eps 16)
RAD_NODE_TYPES = ("loc", "size")
RAD_TECHNIQUES = ("none", "DI", "TI")
RAD_SWEEP_EPS = (4.0, 8.0, 12.0)
RAD_DEFAULT_SETTING = {"node_type": "cls", "technique": "SI", "eps": RAD_EPS}

#: RobustDet: the standard model first (the baseline of the paired differences), then the robust entries
ROBUST_MODELS = ("ssd_vgg", "ssd_vgg-at-cls", "ssd_vgg-at-loc", "ssd_vgg-mtd", "ssd_vgg-cwat", "robustdet",
                 "robustdet-cfr")
ROBUST_ATTACKS = ("clean", "cls", "loc", "cwa", "dag")
ROBUST_SWEEP_STEPS = (1, 5, 10, 20)
#: default images: the issue's runs (RAD on >= 200 images, RobustDet Table 1 on >= 100)
DEFAULT_LIMITS = {"rad": 200, "robustdet": 100}

# claims' thresholds
WHITE_BOX_CUT = 0.80       # RAD cuts the white-box mAP50 by at least 80 %
BASELINE_MARGIN = 0.20     # RAD's black-box mean at least 20 % below every baseline's
HALVED = 0.50              # black-box mAP50 halved (and the project goal, per victim)
CLEAN_GAP = 0.03           # RobustDet within 3 points of the standard model on clean images


class StaleStepError(AdvdetError):
    """A step file exists but was made with other settings; it is kept, the run stops."""


# ------------------------------------------------------------------------------------------- verdicts
def verdict(ci: Mapping | None, threshold: float, *, strict: bool = False) -> str:
    """The verdict of the claim "statistic >= ``threshold``" (``> threshold`` when ``strict``) from the
    statistic's interval ``ci`` {value, lo, hi}: ``holds`` when the whole interval satisfies it, ``fails``
    when no point of it does, ``undecided`` when the interval crosses the threshold or is undefined."""
    lo = None if not ci else ci.get("lo")
    hi = None if not ci else ci.get("hi")
    if lo is None or hi is None or np.isnan(lo) or np.isnan(hi):
        return UNDECIDED
    t = float(threshold)
    if (lo > t) if strict else (lo >= t):
        return HOLDS
    if (hi <= t) if strict else (hi < t):
        return FAILS
    return UNDECIDED


def combine(verdicts: Sequence[str]) -> str:
    """A claim over several parts: ``fails`` if any part fails, ``holds`` if every part holds (and there is
    at least one), else ``undecided``."""
    vs = list(verdicts)
    if any(v == FAILS for v in vs):
        return FAILS
    if vs and all(v == HOLDS for v in vs):
        return HOLDS
    return UNDECIDED


def ratio_samples(num: Any, den: Any) -> np.ndarray:
    """``num / den`` resample by resample; NaN where ``den`` is not positive or either side is NaN."""
    a = np.asarray(num, dtype=np.float64)
    b = np.asarray(den, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"ratio of samples of different shapes: {a.shape} vs {b.shape}")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def _ratio_point(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not b > 0 else float(a) / float(b)


def reduction_interval(attacked: float | None, reference: float | None, attacked_samples: Any,
                       reference_samples: Any, level: float = DEFAULT_LEVEL) -> dict:
    """The relative reduction ``1 - attacked / reference`` (e.g. 0.8 = mAP50 cut by 80 %) with its interval,
    the ratio taken on every resample (both sides drawn on the same resamples)."""
    r = _ratio_point(attacked, reference)
    return interval(None if r is None else 1.0 - r, 1.0 - ratio_samples(attacked_samples, reference_samples), level)


def difference_interval(a: float | None, b: float | None, samples_a: Any, samples_b: Any,
                        level: float = DEFAULT_LEVEL) -> dict:
    """``a - b`` with the interval of the per-resample difference (paired)."""
    from advdet.metrics.bootstrap import paired_interval

    return paired_interval(a, b, samples_a, samples_b, level)


def mean_samples(stack: Sequence[Any]) -> np.ndarray:
    """Per-resample mean over several cells, leaving out cells undefined (NaN) on a resample."""
    a = np.vstack([np.asarray(s, dtype=np.float64) for s in stack])
    ok = ~np.isnan(a)
    n = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(ok, a, 0.0).sum(axis=0) / np.maximum(n, 1), np.nan)


def _point(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and (np.isnan(v) or v < 0)) else float(v)


def _mean_point(vals: Sequence[float | None]) -> float | None:
    v = [x for x in vals if x is not None]
    return float(sum(v) / len(v)) if v else None


def _part(label: str, ci: dict, threshold: float, strict: bool = False) -> dict:
    return {"label": label, "interval": ci, "verdict": verdict(ci, threshold, strict=strict)}


def _claim(cid: str, text: str, statistic: str, threshold: float, parts: list[dict], strict: bool = False,
           ci: dict | None = None) -> dict:
    v = verdict(ci, threshold, strict=strict) if ci is not None else combine([p["verdict"] for p in parts])
    return {"id": cid, "claim": text, "statistic": statistic, "threshold": threshold,
            "comparison": ">" if strict else ">=", "interval": ci, "parts": parts, "verdict": v}


def _rows_by_attack(result: Mapping, attack: str) -> list[int]:
    return [i for i, r in enumerate(result["rows"]) if r.get("attack") == attack and r.get("sweep_value") is None]


def rad_claims(result: Mapping, samples: Mapping, *, reference: str = "rad",
               level: float = DEFAULT_LEVEL) -> list[dict]:
    """The RAD paper's claims on a Table 3 ``transfer_matrix`` result and its ``_bootstrap_samples``
    (``cells`` {(row index, victim): mAP50 per resample}), every statistic computed per resample:

    - ``white_box_cut``: ``1 - RAD/No Attack`` on the surrogate's own cell >= 0.80;
    - ``beats_baselines``: per attack baseline (every other detector or classifier attack row),
      ``1 - RAD black-box mean / baseline black-box mean`` >= 0.20, over the RAD row's black-box victims
      on both sides; holds when it holds for every baseline;
    - ``black_box_halved``: ``1 - RAD black-box mean / No Attack black-box mean`` >= 0.50.
    """
    rows, cells = result["rows"], samples["cells"]
    out: list[dict] = []
    for ri in _rows_by_attack(result, reference):
        r = rows[ri]
        tag = "" if len(_rows_by_attack(result, reference)) == 1 else f" ({r['label']})"
        wb = r.get("white_box")
        if wb is not None:
            v = wb["victim"]
            ci = reduction_interval(_point(r["metrics"][v]["map50"]), _point(rows[0]["metrics"][v]["map50"]),
                                    cells[(ri, v)], cells[(0, v)], level)
            out.append(_claim("white_box_cut" + tag, f"RAD cuts the white-box mAP50 ({v}) by at least 80 %",
                              f"1 - RAD/No Attack mAP50 of {v}", WHITE_BOX_CUT, [], ci=ci))
        bb = list(r["black_box"]["victims"])
        if not bb:
            continue

        def bb_pair(j: int) -> tuple[float | None, np.ndarray]:
            return (_mean_point([_point(rows[j]["metrics"][v]["map50"]) for v in bb]),
                    mean_samples([cells[(j, v)] for v in bb]))

        rad_pt, rad_s = bb_pair(ri)
        parts = []
        for j, b in enumerate(rows):
            if b.get("kind") not in ("detector", "classifier") or b.get("attack") == reference:
                continue
            if b.get("kind") == "detector" and b.get("surrogate") != r.get("surrogate"):
                continue
            if b.get("sweep_value") is not None:
                continue
            b_pt, b_s = bb_pair(j)
            parts.append(_part(b["label"], reduction_interval(rad_pt, b_pt, rad_s, b_s, level), BASELINE_MARGIN))
        out.append(_claim("beats_baselines" + tag, "RAD's black-box mean mAP50 is at least 20 % below every "
                          "baseline's", "1 - RAD/baseline black-box mean mAP50, per baseline", BASELINE_MARGIN,
                          parts))
        c_pt, c_s = bb_pair(0)
        out.append(_claim("black_box_halved" + tag, "RAD halves the black-box mAP50",
                          "1 - RAD/No Attack black-box mean mAP50", HALVED, [],
                          ci=reduction_interval(rad_pt, c_pt, rad_s, c_s, level)))
    return out


def rad_goal(result: Mapping, samples: Mapping, *, level: float = DEFAULT_LEVEL) -> list[dict]:
    """The project's goal for its best transfer attack, per attack row (and the Ablation, for scale):
    halve the black-box mAP50 of every unseen zoo family, i.e. ``1 - row/No Attack`` >= 0.5 on every
    black-box victim of the row. Each entry: ``attack``, ``parts`` per victim (reduction with interval and
    verdict), ``worst`` (the victim with the smallest reduction), ``verdict`` (every victim)."""
    rows, cells = result["rows"], samples["cells"]
    out = []
    for ri, r in enumerate(rows):
        if ri == 0 or r.get("sweep_value") is not None:
            continue
        parts = []
        for v in r["black_box"]["victims"]:
            ci = reduction_interval(_point(r["metrics"][v]["map50"]), _point(rows[0]["metrics"][v]["map50"]),
                                    cells[(ri, v)], cells[(0, v)], level)
            parts.append(_part(v, ci, HALVED))
        defined = [p for p in parts if p["interval"]["value"] is not None]
        worst = min(defined, key=lambda p: p["interval"]["value"])["label"] if defined else None
        out.append({"attack": r["label"], "kind": r["kind"], "surrogate": r.get("surrogate"), "threshold": HALVED,
                    "parts": parts, "worst": worst, "verdict": combine([p["verdict"] for p in parts])})
    return out


def robustdet_claims(result: Mapping, samples: Mapping, *, robust: Sequence[str] = ("robustdet", "robustdet-cfr"),
                     baselines: Sequence[str] = ("ssd_vgg-mtd", "ssd_vgg-cwat"), standard: str = "ssd_vgg",
                     level: float = DEFAULT_LEVEL) -> list[dict]:
    """The RobustDet paper's claims on a ``robustness_table`` result and its resamples (``cells`` {model:
    {column: mAP50 per resample}}), per RobustDet entry present:

    - ``clean_within_3``: its clean mAP50 minus the standard model's >= -0.03 (within 3 points);
    - ``above_mtd_cwat``: under every attack column, its mAP50 minus each of MTD's and CWAT's > 0; holds when
      it holds for every (attack, baseline) pair.
    """
    cells = samples["cells"]
    m50 = result["map50"]
    out = []
    attacks = [a for a in result["attacks"] if a != "clean"]
    for r in robust:
        if r not in m50:
            continue
        if standard in m50 and "clean" in m50[r]:
            ci = difference_interval(_point(m50[r]["clean"]), _point(m50[standard]["clean"]),
                                     cells[r]["clean"], cells[standard]["clean"], level)
            out.append(_claim(f"clean_within_3 ({r})", f"{r} is within 3 points of {standard} on clean images",
                              f"clean mAP50 of {r} - {standard}", -CLEAN_GAP, [], ci=ci))
        parts = []
        for a in attacks:
            for b in baselines:
                if b not in m50:
                    continue
                ci = difference_interval(_point(m50[r][a]), _point(m50[b][a]), cells[r][a], cells[b][a], level)
                parts.append(_part(f"{a}: {r} - {b}", ci, 0.0, strict=True))
        if parts:
            out.append(_claim(f"above_mtd_cwat ({r})", f"{r} is above MTD and CWAT under every attack",
                              f"mAP50 of {r} - baseline, per attack and baseline", 0.0, parts, strict=True))
    return out


# ------------------------------------------------------------------------------------------- steps
@dataclass(frozen=True)
class Step:
    """One resumable part of a reproduction: a benchmark call (``kind``: ``transfer``, ``robustness`` or
    ``steps_sweep``) with its own parameters; written to ``OUT/<target>/<name>.json``."""

    name: str
    title: str
    kind: str
    params: dict = field(default_factory=dict)


def rad_steps(surrogate: str = RAD_SURROGATE, victims: Sequence[str] = RAD_VICTIMS,
              attacks: Sequence[str] = RAD_TABLE3_ATTACKS, classifier: str = "classifier") -> list[Step]:
    """The RAD reproduction's steps (see the module docstring)."""
    base = {"surrogates": [surrogate], "victims": list(victims), "classifier": classifier}
    return [
        Step("table3", "Tables 3-5: every attack, the classifier rows, the Gaussian ablation", "transfer",
             {**base, "attacks": list(attacks), "eps": RAD_EPS}),
        Step("table1_node_type", "Table 1: node types", "transfer",
             {**base, "attacks": ["rad"], "eps": RAD_EPS, "sweep": "node_type", "sweep_values": list(RAD_NODE_TYPES)}),
        Step("table2_technique", "Table 2: update techniques", "transfer",
             {**base, "attacks": ["rad"], "eps": RAD_EPS, "sweep": "technique", "sweep_values": list(RAD_TECHNIQUES)}),
        Step("fig7_eps", "Fig. 7: eps sweep", "transfer", {**base, "attacks": ["rad"], "eps": list(RAD_SWEEP_EPS)}),
    ]


def robustdet_steps(models: Sequence[str] = ROBUST_MODELS) -> list[Step]:
    """The RobustDet reproduction's steps (see the module docstring)."""
    return [
        Step("table1", "Table 1: clean, A_cls, A_loc, CWA, DAG", "robustness",
             {"models": list(models), "attacks": list(ROBUST_ATTACKS)}),
        Step("fig7_steps", "Fig. 7a/b: A_cls and A_loc against the number of steps", "steps_sweep",
             {"models": list(models), "attacks": ["cls", "loc"], "steps": list(ROBUST_SWEEP_STEPS)}),
    ]


def _step_models(step: Step) -> list[str]:
    p = step.params
    if step.kind == "transfer":
        names = list(p["surrogates"]) + list(p["victims"])
        if any(a.startswith("cls-") for a in p["attacks"]):
            names.append(p["classifier"])
        return list(dict.fromkeys(names))
    return list(p["models"])


def _weights_fingerprint(name: str, models: Mapping | None) -> dict:
    """Which weights a model will use, before it is loaded: the zoo file and its sha256, ``given`` (a module
    passed in) or ``untrained``."""
    if models and name in models:
        return {"file": None, "sha256": None, "origin": "given"}
    from advdet.models.weights import sha256_file
    from advdet.models.zoo import zoo_entry

    path = Path(zoo_entry(name).weights_path)
    if not path.is_file():
        return {"file": None, "sha256": None, "origin": "untrained"}
    return {"file": str(path), "sha256": sha256_file(path), "origin": "zoo"}


def _jsonify(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _config(target: str, step: Step, *, data: str, limit: int | None, seed: int, batch_size: int, n_boot: int,
            boot_seed: int, attack_kwargs: Mapping, weights: Mapping[str, dict]) -> dict:
    """What a step's numbers depend on; a step file with another config is stale."""
    return _jsonify({"format": FORMAT, "target": target, "step": step.name, "kind": step.kind, "params": step.params,
                     "data": data, "limit": limit, "seed": seed, "batch_size": batch_size, "n_boot": n_boot,
                     "boot_seed": boot_seed, "attack_kwargs": attack_kwargs,
                     "weights_sha256": {m: weights[m]["sha256"] or weights[m]["origin"] for m in _step_models(step)}})


def _diff_keys(a: Mapping, b: Mapping) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _run_step(step: Step, *, data: str, limit: int | None, seed: int, batch_size: int, n_boot: int, boot_seed: int,
              device, models: Mapping | None, attack_kwargs: Mapping, allow_untrained: bool, progress: bool,
              ) -> tuple[dict, dict]:
    """Run one step; returns (JSON-ready result, derived claims)."""
    from advdet.bench.transfer_report import json_ready

    p = dict(step.params)
    common = dict(limit=limit, batch_size=batch_size, seed=seed, device=device, progress=progress, n_boot=n_boot,
                  boot_seed=boot_seed, allow_untrained=allow_untrained)
    derived: dict = {}
    if step.kind == "transfer":
        from advdet.bench.transfer import transfer_matrix

        kw = {k: dict(v) for k, v in RAD_ATTACK_KWARGS.items()}
        for k, v in attack_kwargs.items():
            kw.setdefault(k, {}).update(v)
        res = transfer_matrix(p.pop("surrogates"), p.pop("attacks"), p.pop("victims"), data, models=models,
                              attack_kwargs=kw, examples=0, relevance=False, **p, **common)
        if step.name == "table3" and res.get("_bootstrap_samples"):
            derived = {"claims": rad_claims(res, res["_bootstrap_samples"]),
                       "goal": rad_goal(res, res["_bootstrap_samples"])}
        return json_ready(res), derived
    from advdet.bench.robustness import robustness_steps_sweep, robustness_table

    names = p.pop("models")
    dets = {k: v for k, v in (models or {}).items() if k in names} or None
    samples: dict = {}
    fn = robustness_table if step.kind == "robustness" else robustness_steps_sweep
    res = fn(names, p.pop("attacks"), data, detectors=dets, attack_kwargs=dict(attack_kwargs) or None,
             samples_out=samples, **p, **common)
    if step.kind == "robustness" and samples:
        derived = {"claims": robustdet_claims(res, samples)}
    return json_ready(res), derived


def reproduce_command(target: str, *, limit: int | None, out: str | Path, steps: Sequence[str] | None = None,
                      extra: Sequence[str] = ()) -> str:
    """The command line that makes (or resumes) a reproduction, as the page states it."""
    parts = ["advdet", "reproduce", target]
    if limit is not None:
        parts += ["--limit", str(limit)]
    parts += ["--out", str(out)]
    if steps:
        parts += ["--steps", ",".join(steps)]
    return " ".join(list(parts) + list(extra))


def reproduce(target: str, out: str | Path = "docs/results", *, limit: int | None = None, data: str = "shapes-val",
              steps: Sequence[str] | None = None, seed: int = 0, batch_size: int = 8, n_boot: int = 1000,
              boot_seed: int = 0, device=None, models: Mapping | None = None, plan: Sequence[Step] | None = None,
              attack_kwargs: Mapping[str, dict] | None = None, allow_untrained: bool = False,
              progress: bool = True, command: str | None = None,
              on_step: Callable[[str, str, float], None] | None = None) -> dict:
    """Make or resume the reproduction ``target`` (``rad`` or ``robustdet``) in ``out``.

    Every step of ``plan`` (default :func:`rad_steps` / :func:`robustdet_steps`; ``steps`` picks some by name)
    is loaded from ``out/<target>/<step>.json`` when present (its settings must match: ``StaleStepError``
    otherwise), else computed and written atomically. Then ``out/<target>.md`` and ``out/<target>.json``
    (command, weights and their sha256, wall time, verdicts, tables; figures in ``out/<target>/``) are
    written from every step file present. ``limit``: images (default :data:`DEFAULT_LIMITS`). ``models``:
    already built models by name (tests: tiny random models); ``on_step(name, status, seconds)`` is called
    per step with ``computed`` or ``reused``. Returns the page's JSON (plus ``md`` and ``json`` paths).
    """
    if target not in TARGETS:
        raise AdvdetError(f"unknown reproduction {target!r}; choose one of {', '.join(TARGETS)}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1 (the verdicts need bootstrap intervals), got {n_boot}")
    if limit is None:
        limit = DEFAULT_LIMITS[target]
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    t0 = time.perf_counter()
    out = Path(out)
    all_steps = list(plan) if plan is not None else (rad_steps() if target == "rad" else robustdet_steps())
    known = [s.name for s in all_steps]
    if steps:
        bad = [s for s in steps if s not in known]
        if bad:
            raise AdvdetError(f"unknown step {', '.join(bad)} of {target}; its steps are {', '.join(known)}")
    todo = [s for s in all_steps if not steps or s.name in steps]
    command = command or reproduce_command(target, limit=limit, out=out, steps=steps)
    attack_kwargs = {k: dict(v) for k, v in (attack_kwargs or {}).items()}
    if data in ("shapes-val", "shapes-train"):
        from advdet.data.shapes import ensure_default_shapes

        ensure_default_shapes()
    names = list(dict.fromkeys(n for s in all_steps for n in _step_models(s)))
    weights = {n: _weights_fingerprint(n, models) for n in names}
    from advdet.data.io import atomic_write_json, read_json

    status: dict[str, str] = {}
    for step in todo:
        path = out / target / f"{step.name}.json"
        cfg = _config(target, step, data=data, limit=limit, seed=seed, batch_size=batch_size, n_boot=n_boot,
                      boot_seed=boot_seed, attack_kwargs=attack_kwargs, weights=weights)
        if path.is_file():
            old = read_json(path)
            if old.get("config") != cfg:
                keys = _diff_keys(old.get("config") or {}, cfg)
                raise StaleStepError(f"{path}: made with other settings ({', '.join(keys)} differ); it is kept. "
                                     "Pass another --out, or move the file away to recompute it")
            status[step.name] = "reused"
            log.info("%s: reusing %s", step.name, path)
            if on_step is not None:
                on_step(step.name, "reused", float(old.get("seconds", 0.0)))
            continue
        log.info("%s: computing (%s)", step.name, step.title)
        ts = time.perf_counter()
        result, derived = _run_step(step, data=data, limit=limit, seed=seed, batch_size=batch_size, n_boot=n_boot,
                                    boot_seed=boot_seed, device=device, models=models, attack_kwargs=attack_kwargs,
                                    allow_untrained=allow_untrained, progress=progress)
        secs = round(time.perf_counter() - ts, 3)
        atomic_write_json(path, {"format": FORMAT, "step": step.name, "title": step.title, "config": cfg,
                                 "seconds": secs, "finished_utc": _now(), "result": result, "derived": derived},
                          indent=1)
        status[step.name] = "computed"
        if on_step is not None:
            on_step(step.name, "computed", secs)
        _write_page(target, out, all_steps, status, weights, command, limit, t0)  # progress is visible
    return _write_page(target, out, all_steps, status, weights, command, limit, t0)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# ------------------------------------------------------------------------------------------- pages
def _load_steps(target: str, out: Path, steps: Sequence[Step]) -> dict[str, dict]:
    from advdet.data.io import read_json

    found = {}
    for s in steps:
        p = out / target / f"{s.name}.json"
        if p.is_file():
            found[s.name] = read_json(p)
    return found


def _fmt(ci: Mapping | None, scale: float = 100.0, signed: bool = False) -> str | None:
    from advdet.bench.intervals import fmt_interval

    return fmt_interval(ci, scale, signed)


def _page_weights(records: Mapping[str, dict], fingerprints: Mapping[str, dict]) -> dict[str, dict]:
    """Per model the weights file and sha256 the step results name (``weights_sha256`` of the transfer
    results' model info; the robustness results' weights file, hashed)."""
    from advdet.models.weights import sha256_file

    out: dict[str, dict] = {}
    for rec in records.values():
        res = rec["result"]
        infos = res.get("models") if isinstance(res.get("models"), dict) else {}
        for name, info in infos.items():
            fp = fingerprints.get(name, {})
            if fp.get("origin") == "given":  # a module passed in (its name may still be a zoo entry's)
                out.setdefault(name, dict(fp))
            elif isinstance(info, dict) and "weights_sha256" in info:
                out.setdefault(name, {"file": info.get("weights") or fp.get("file"), "sha256": info["weights_sha256"],
                                      "origin": fp.get("origin", "zoo" if info["weights_sha256"] else "given")})
        origins = res.get("weights") if isinstance(res.get("weights"), dict) else {}
        for name, origin in origins.items():
            if name in out:
                continue
            if fingerprints.get(name, {}).get("origin") == "given":
                out[name] = dict(fingerprints[name])
            elif origin in ("untrained", "given"):
                out[name] = {"file": None, "sha256": None, "origin": origin}
            else:
                p = Path(origin)
                out[name] = {"file": str(p), "sha256": sha256_file(p) if p.is_file() else None, "origin": "zoo"}
    return out


def _claim_rows(claims: Sequence[dict]) -> list[list]:
    """Rows of the verdict table: one per claim (its interval or, for a claim over parts, the combined
    verdict), then one per part."""
    rows = []
    for c in claims:
        signed = c["threshold"] <= 0
        t = 100 * c["threshold"]
        thr = f"{c['comparison']} {t:+.0f}" if signed else f"{c['comparison']} {t:.0f}"
        stat = _fmt(c["interval"], signed=signed) if c["interval"] is not None else "every part below"
        rows.append([c["id"], c["claim"], c["statistic"], stat or "-", thr, f"**{c['verdict']}**"])
        for p in c["parts"]:
            rows.append(["", "", p["label"], _fmt(p["interval"], signed=signed) or "-", thr, p["verdict"]])
    return rows


def _write_figure(path: Path, fig) -> None:
    from advdet.bench.plots import figure_png
    from advdet.data.io import atomic_write_bytes

    atomic_write_bytes(path, figure_png(fig))


def _bootstrap_rows(res: Mapping) -> list[tuple[dict, dict]]:
    block = res.get("bootstrap") or {}
    return list(zip(res["rows"], block.get("rows") or [{} for _ in res["rows"]]))


def _sweep_table(rep, title: str, records: Mapping[str, dict], name: str, key: str, default) -> list | None:
    """A RAD sweep step as a table of mAP50 with intervals per victim, Table 3's RAD row as the default
    value."""
    rows = []
    victims = None
    t3 = records.get("table3")
    if t3 is not None:
        res3 = t3["result"]
        victims = res3["victims"]
        for r, ci in _bootstrap_rows(res3):
            if r["attack"] == "rad":
                tag = f"eps={float(default):g}" if key == "eps" else f"[{default}]"
                rows.append((default, f"{r['label']} {tag} (Table 3's row)", r, ci))
    rec = records.get(name)
    if rec is not None:
        res = rec["result"]
        victims = victims or res["victims"]
        for r, ci in _bootstrap_rows(res):
            if r.get("sweep") is not None:
                rows.append((r["sweep_value"], r["label"], r, ci))
    if not rows:
        rep.add_text(f"## {title}\n\nNot run yet (step `{name}`).")
        return None
    if key == "eps":
        rows.sort(key=lambda t: float(t[0]))
    cols = [key, "row"] + victims + ["black-box mean"]
    table = [[t[0], t[1]] + [_fmt((t[3].get("cells") or {}).get(v)) for v in victims] + [_fmt(t[3].get("black_box"))]
             for t in rows]
    note = "box mAP50 x100 with 95 % bootstrap intervals; every row on the same images and resamples"
    if rec is None:
        note += f"; step `{name}` has not run yet: only Table 3's row"
    rep.add_table(title, cols, table, note=note)
    return rows


def _rad_page(rep, records: Mapping[str, dict], out: Path) -> dict:
    from advdet.bench.intervals import transfer_interval_table, transfer_paired_table
    from advdet.bench.transfer_report import transfer_table

    summary: dict = {"claims": [], "goal": []}
    t3 = records.get("table3")
    if t3 is not None:
        res = t3["result"]
        claims, goal = t3["derived"].get("claims", []), t3["derived"].get("goal", [])
        summary.update(claims=claims, goal=goal)
        rep.add_table("Verdicts: the paper's claims", ["claim", "text", "statistic", "value [95 % interval] (%)",
                                                        "threshold", "verdict"], _claim_rows(claims),
                      note="statistics computed on every bootstrap resample of the images; holds: the whole "
                           "interval meets the threshold; fails: none of it does; undecided: it crosses the threshold")
        if goal:
            victims = [p["label"] for p in goal[0]["parts"]]
            cols = ["attack"] + [f"{v} cut %" for v in victims] + ["worst victim", "verdict"]
            table = []
            for g in goal:
                by = {p["label"]: p for p in g["parts"]}
                table.append([g["attack"]] + [_fmt(by[v]["interval"]) if v in by else "-" for v in victims]
                             + [g["worst"] or "-", g["verdict"]])
            rep.add_table("Project goal: halve the black-box mAP50 of every unseen zoo family at eps 16", cols, table,
                          note="per black-box victim of the row: 1 - row/No Attack mAP50, per resample; the goal "
                               "holds for an attack when it holds (interval >= 50 %) on every victim")
        ci_table = transfer_interval_table(res)
        if ci_table is not None:
            rep.add_table("Table 3: box mAP50 (x100) with 95 % bootstrap intervals", *ci_table,
                          note="`*` white-box cell; black-box mean over the victims other than the row's surrogate")
        paired = transfer_paired_table(res)
        if paired is not None:
            rep.add_table("Table 3, paired: RAD minus each baseline, mAP50 points", *paired,
                          note="on the same resamples; negative: RAD leaves a lower mAP50")
        cols, rows = transfer_table(res, "map")
        rep.add_table("Table 3: box mAP@[.5:.95] (x100)", cols, rows)
        masks = [v for v in res["victims"] if "segm_map" in res["rows"][0]["metrics"][v]]
        if masks:
            cols = ["attack"] + [f"{v} {k}" for v in masks for k in ("segm mAP", "segm mAP50")]
            table = [[r["label"]] + [None if r["metrics"][v].get(k) is None else 100 * r["metrics"][v][k]
                                     for v in masks for k in ("segm_map", "segm_map50")] for r in res["rows"]]
            rep.add_table("Table 4: segmentation mAP (x100)", cols, table)
        rep.add_table("Table 5: perturbation (0-255)", ["attack", "RMSE", "mean Linf", "max Linf"],
                      [[r["label"], r["perturbation"]["rmse"], r["perturbation"]["linf"], r["perturbation"]["linf_max"]]
                       for r in res["rows"]])
    else:
        rep.add_text("## Verdicts\n\nTable 3 (the step the verdicts come from) has not run yet.")
    _sweep_table(rep, "Table 1: node types (RAD)", records, "table1_node_type", "node_type",
                 RAD_DEFAULT_SETTING["node_type"])
    _sweep_table(rep, "Table 2: update techniques (RAD)", records, "table2_technique", "technique",
                 RAD_DEFAULT_SETTING["technique"])
    rows = _sweep_table(rep, "Fig. 7: RAD against eps", records, "fig7_eps", "eps", RAD_DEFAULT_SETTING["eps"])
    if rows and t3 is not None:
        from advdet.bench.plots import eps_curve_figure

        res3 = t3["result"]
        victims = res3["victims"]
        eps = [float(t[0]) for t in rows]
        fig = eps_curve_figure(eps, {v: [t[2]["metrics"][v]["map50"] for t in rows] for v in victims},
                               "RAD: box mAP50 against eps (RAD Fig. 7)", ylabel="box mAP50",
                               reference={v: res3["rows"][0]["metrics"][v]["map50"] for v in victims})
        _write_figure(out / "rad" / "fig7_eps.png", fig)
        rep.add_text("![RAD: box mAP50 against eps](rad/fig7_eps.png)")
    return summary


def _rob_page(rep, records: Mapping[str, dict], out: Path) -> dict:
    from advdet.bench import intervals as ci
    from advdet.bench.robustness import ATTACK_LABELS, attack_label, sweep_figure, sweep_rows, table_rows

    summary: dict = {"claims": []}
    t1 = records.get("table1")
    if t1 is not None:
        res = t1["result"]
        claims = t1["derived"].get("claims", [])
        summary["claims"] = claims
        rep.add_table("Verdicts: the paper's claims", ["claim", "text", "statistic", "value [95 % interval] (points)",
                                                        "threshold", "verdict"], _claim_rows(claims),
                      note="differences computed on every bootstrap resample of the images (paired); holds: the "
                           "whole interval meets the threshold; fails: none of it does; undecided: it crosses it")
        cols, rows = table_rows(res)
        rep.add_table("Table 1: mAP50 (%) under white-box attacks", cols, rows,
                      note=f"arrows: change against {res['models'][0]}; {res['metric']}, eps {res['eps']:g}")
        t = ci.robustness_interval_table(res, ATTACK_LABELS)
        if t is not None:
            rep.add_table("Table 1 with 95 % bootstrap intervals", *t)
        t = ci.robustness_paired_table(res, ATTACK_LABELS)
        if t is not None:
            rep.add_table(f"Table 1, paired: each model minus {res['models'][0]}", *t)
    else:
        rep.add_text("## Verdicts\n\nTable 1 (the step the verdicts come from) has not run yet.")
    f7 = records.get("fig7_steps")
    if f7 is not None:
        res = f7["result"]
        for a in res["attacks"]:
            t = ci.sweep_interval_table(res, a)
            cols, rows = t if t is not None else sweep_rows(res, a)
            rep.add_table(f"Fig. 7: {attack_label(a)} against the number of steps, mAP50 (%)", cols, rows)
        _write_figure(out / "robustdet" / "fig7_steps.png", sweep_figure(res))
        rep.add_text("![mAP50 against attack steps](robustdet/fig7_steps.png)")
    else:
        rep.add_text("## Fig. 7a/b\n\nNot run yet.")
    return summary


def _write_page(target: str, out: Path, steps: Sequence[Step], status: Mapping[str, str],
                fingerprints: Mapping[str, dict], command: str | None, limit: int, t0: float) -> dict:
    from advdet import __version__
    from advdet.bench.report import Report
    from advdet.data.io import atomic_write_bytes, atomic_write_json

    import torch

    records = _load_steps(target, out, steps)
    wall = round(time.perf_counter() - t0, 3)
    step_seconds = {n: r.get("seconds") for n, r in records.items()}
    weights = _page_weights(records, fingerprints)
    paper = "RAD (Chen et al.)" if target == "rad" else "RobustDet (Dong et al., ECCV 2022)"
    rep = Report(f"{paper} on the shipped zoo: advdet reproduce {target}", float_format="{:.1f}")
    first = next(iter(records.values()), None)
    images = first["result"].get("images") if first else None
    lines = [f"Made by `{command}` (advdet {__version__}; resumable: every step is kept in `{target}/STEP.json` "
             "and reused when present).", "",
             f"- data: `{first['config']['data'] if first else '-'}`, {images if images is not None else limit} "
             f"images; seed {first['config']['seed'] if first else '-'}; "
             f"{first['config']['n_boot'] if first else '-'} bootstrap resamples",
             f"- wall time of the last invocation: {wall:.0f} s; the steps' own wall times: "
             + ", ".join(f"{n} {s:.0f} s" for n, s in step_seconds.items() if s is not None)
             + f" (total {sum(s for s in step_seconds.values() if s):.0f} s)",
             f"- machine of the last invocation: {platform.machine()}, {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}", ""]
    if target == "rad":
        lines.append("The default-setting rows of Tables 1 and 2 and of Fig. 7 (cls nodes, SI, eps 16) are Table "
                     "3's RAD row: same images, seed and settings, crafted once.")
    rep.add_text("\n".join(lines))
    rep.add_table("Steps", ["step", "what", "status", "seconds", "finished"],
                  [[s.name, s.title, status.get(s.name, "reused" if s.name in records else "not run"),
                    records[s.name]["seconds"] if s.name in records else None,
                    records[s.name].get("finished_utc") if s.name in records else None] for s in steps])
    rep.add_table("Weights", ["model", "file", "sha256"],
                  [[m, w["file"] or w["origin"], w["sha256"] or "-"] for m, w in weights.items()])
    summary = _rad_page(rep, records, out) if target == "rad" else _rob_page(rep, records, out)
    page = {"format": FORMAT, "target": target, "command": command, "written_utc": _now(), "wall_seconds": wall,
            "step_seconds": step_seconds, "steps": {s.name: {"file": f"{target}/{s.name}.json",
                                                             "status": status.get(s.name, "reused" if s.name in
                                                                                  records else "not run")}
                                                    for s in steps},
            "weights": weights, **summary}
    md_path, json_path = out / f"{target}.md", out / f"{target}.json"
    atomic_write_bytes(md_path, rep.to_markdown().encode("utf-8"))
    atomic_write_json(json_path, page, indent=1)
    return {**page, "md": str(md_path), "json": str(json_path)}
