"""The claims of a reproduction and their verdicts, computed from bootstrap intervals.

**Verdicts.** A claim is a statistic compared with a threshold. Its interval is the 95 % percentile
interval of the statistic computed **on each bootstrap resample** of the images (the resamples the benchmark
drew; ratios are taken resample by resample, never as a ratio of intervals). :func:`verdict`: a claim
"statistic >= t" **holds** when the whole interval is at or above t, **fails** when it is entirely below t
and is **undecided** when the interval crosses t (or is undefined). A claim over several parts ("every
baseline", "every victim") holds when every part holds, fails when any part fails, else is undecided
(:func:`combine`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from advdet.metrics.bootstrap import DEFAULT_LEVEL, interval

__all__ = ["HOLDS", "FAILS", "UNDECIDED", "verdict", "combine", "ratio_samples", "reduction_interval",
           "difference_interval", "mean_samples", "rad_claims", "rad_goal", "held_out_goal", "robustdet_claims"]

HOLDS, FAILS, UNDECIDED = "holds", "fails", "undecided"


# claims' thresholds
WHITE_BOX_CUT = 0.80       # RAD cuts the white-box mAP50 by at least 80 %
BASELINE_MARGIN = 0.20     # RAD's black-box mean at least 20 % below every baseline's
HALVED = 0.50              # black-box mAP50 halved (and the project goal, per victim)
CLEAN_GAP = 0.03           # RobustDet within 3 points of the standard model on clean images


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


def _halved(parts: list[dict]) -> dict:
    """The goal "halved on every part": the parts, the one with the smallest reduction, the combined verdict."""
    defined = [p for p in parts if p["interval"]["value"] is not None]
    worst = min(defined, key=lambda p: p["interval"]["value"])["label"] if defined else None
    return {"threshold": HALVED, "parts": parts, "worst": worst, "verdict": combine([p["verdict"] for p in parts])}


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
        out.append({"attack": r["label"], "kind": r["kind"], "surrogate": r.get("surrogate"), **_halved(parts)})
    return out


def held_out_goal(result: Mapping, samples: Mapping, *, level: float = DEFAULT_LEVEL) -> list[dict]:
    """The project's goal on the leave-one-out rows of a ``transfer_matrix`` result (``leave_one_out``), per
    attack (and sweep value): the ensemble of every other victim halves the held-out victim's mAP50,
    ``1 - row/No Attack`` >= 0.5 on every held-out victim. Each entry: ``attack``, ``sweep_value``, ``parts``
    per held-out victim (``label``, ``ensemble`` (its members), reduction ``interval``, ``verdict``,
    ``map50`` / ``clean_map50``), ``worst`` and ``verdict`` (every held-out victim)."""
    rows, cells = result["rows"], samples["cells"]
    by_attack: dict[tuple, list[dict]] = {}
    for ri, r in enumerate(rows):
        v = r.get("held_out")
        if v is None:
            continue
        att, clean = _point(r["metrics"][v]["map50"]), _point(rows[0]["metrics"][v]["map50"])
        ci = reduction_interval(att, clean, cells[(ri, v)], cells[(0, v)], level)
        part = _part(v, ci, HALVED)
        part.update(ensemble=r.get("surrogate"), map50=att, clean_map50=clean)
        by_attack.setdefault((r["attack"], r.get("sweep_value")), []).append(part)
    out = []
    for (attack, value), parts in by_attack.items():
        out.append({"attack": attack, "sweep_value": value, **_halved(parts)})
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
