"""The pages of a reproduction: ``OUT/<target>.md`` and ``OUT/<target>.json`` written from every step file
present (command, weights and their sha256, wall time, verdicts, tables; figures in ``OUT/<target>/``)."""

from __future__ import annotations

import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from advdet.bench.reproduce_steps import FORMAT, RAD_DEFAULT_SETTING, Step, step_groups


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


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
    from advdet.models.hub import file_sha256

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
                out[name] = {"file": str(p), "sha256": file_sha256(p) if p.is_file() else None, "origin": "zoo"}
    return out


def _shown_file(w: Mapping) -> str:
    """A weights file as the page shows it: a shipped zoo file as ``advdet/zoo_weights/NAME`` (the package's,
    wherever it is installed; the JSON keeps the full path), any other file as it is, else the origin."""
    if not w.get("file"):
        return w["origin"]
    p = Path(w["file"])
    return f"advdet/zoo_weights/{p.name}" if w.get("origin") == "zoo" and p.parent.name == "zoo_weights" else str(p)


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


def _sweep_table(rep, title: str, records: Mapping[str, dict], names: Sequence[str], key: str,
                 default) -> list | None:
    """A RAD sweep (the steps ``names`` of one group) as a table of mAP50 with intervals per victim, Table
    3's RAD row as the default value."""
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
    missing = [n for n in names if n not in records]
    for n in names:
        if n not in records:
            continue
        res = records[n]["result"]
        victims = victims or res["victims"]
        for r, ci in _bootstrap_rows(res):
            if r.get("sweep") is not None:
                rows.append((r["sweep_value"], r["label"], r, ci))
    if not rows:
        rep.add_text(f"## {title}\n\nNot run yet (steps {', '.join(f'`{n}`' for n in names)}).")
        return None
    if key == "eps":
        rows.sort(key=lambda t: float(t[0]))
    cols = [key, "row"] + victims + ["black-box mean"]
    table = [[t[0], t[1]] + [_fmt((t[3].get("cells") or {}).get(v)) for v in victims] + [_fmt(t[3].get("black_box"))]
             for t in rows]
    note = "box mAP50 x100 with 95 % bootstrap intervals; every row on the same images and resamples"
    if missing:
        note += f"; not run yet: {', '.join(f'`{n}`' for n in missing)}"
    rep.add_table(title, cols, table, note=note)
    return rows


def _rad_page(rep, records: Mapping[str, dict], out: Path, groups: Mapping[str, list[str]]) -> dict:
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
    for title, group, key in (("Table 1: node types (RAD)", "table1_node_type", "node_type"),
                              ("Table 2: update techniques (RAD)", "table2_technique", "technique")):
        if group in groups:
            _sweep_table(rep, title, records, groups[group], key, RAD_DEFAULT_SETTING[key])
    rows = _sweep_table(rep, "Fig. 7: RAD against eps", records, groups["fig7_eps"], "eps",
                        RAD_DEFAULT_SETTING["eps"]) if "fig7_eps" in groups else None
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
    if "ensembles" in groups:
        summary["held_out_goal"] = _ensembles_section(rep, records.get("ensembles"))
    return summary


def _ensembles_section(rep, record: Mapping | None) -> list[dict]:
    """The leave-one-out ensembles: per held-out victim its clean and attacked mAP50 and the cut with its
    interval against the project's goal (halved), then the step's whole table with intervals."""
    from advdet.bench.intervals import transfer_interval_table

    title = "Leave-one-out ensembles: every victim against the ensemble of the others"
    if record is None:
        rep.add_text(f"## {title}\n\nNot run yet (step `ensembles`).")
        return []
    goals = record["derived"].get("held_out_goal", [])

    def name(g: Mapping) -> str:
        return g["attack"] if g.get("sweep_value") is None else f"{g['attack']} [{g['sweep_value']}]"

    table = [[name(g), p["label"], p["ensemble"], _fmt(p["interval"]), p["verdict"]]
             for g in goals for p in g["parts"]]
    table += [[name(g), "every held-out victim", f"worst: {g['worst'] or '-'}", "-", f"**{g['verdict']}**"]
              for g in goals]
    rep.add_table(title, ["attack", "held-out victim", "ensemble", "mAP50 cut % [95 % interval]",
                          "verdict (>= 50 %)"], table,
                  note="1 - ensemble row/No Attack mAP50 of the held-out victim, per resample; the goal (halve "
                       "the mAP50 of every held-out detector) holds for an attack when it holds on every one. A "
                       "held-out detector is unseen, but its backbone's pretraining may be in the ensemble "
                       "(docs/benchmark.md)")
    ci_table = transfer_interval_table(record["result"])
    if ci_table is not None:
        rep.add_table("Leave-one-out ensembles: box mAP50 (x100) with 95 % bootstrap intervals", *ci_table,
                      note="black-box mean: the held-out victim alone; the other cells are the ensemble's members")
    return goals


#: per-model fields of a robustness result, gathered model by model when a group's steps are merged
_PER_MODEL = ("map50", "clean", "seconds", "scores", "weights", "attack_settings")


def merge_model_steps(records: Sequence[Mapping]) -> tuple[dict, dict] | None:
    """One robustness result from the step files of one group (one or more models each, the same images,
    seeds and resamples): the models in step order, their per-model fields, and the intervals and paired
    differences (against the first model) recomputed from the steps' per-resample mAP50 values
    (``derived["samples"]``); returns (result, {model: {column: samples}}), or None without records."""
    from advdet.bench.intervals import grid_intervals

    if not records:
        return None
    first = records[0]["result"]
    shared = [{k: v for k, v in r["config"].items() if k not in ("step", "params", "weights_sha256")}
              | {"params": {k: v for k, v in r["config"]["params"].items() if k != "models"}} for r in records]
    if any(c != shared[0] for c in shared[1:]):
        raise ValueError("the steps of one table were made with different settings: "
                         + ", ".join(r["config"]["step"] for r in records))
    res = dict(first)
    res["models"] = [m for r in records for m in r["result"]["models"]]
    for key in _PER_MODEL:
        if isinstance(first.get(key), dict):
            res[key] = {m: r["result"][key][m] for r in records for m in r["result"]["models"]}
    samples = {m: {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()}
               for r in records for m, cols in (r.get("derived") or {}).get("samples", {}).items()}
    block = first.get("intervals")
    if block and set(samples) >= set(res["models"]):
        points = {m: {k: _cell_value(res, m, k) for k in samples[m]} for m in res["models"]}
        res["intervals"] = grid_intervals(points, samples, res["models"], n_images=block["images"],
                                          n_boot=block["n_boot"], seed=block["seed"], level=block["level"])
    else:
        res["intervals"] = None
    return res, samples


def _cell_value(res: Mapping, model: str, key: str) -> float | None:
    """The point mAP50 of one cell of a robustness table (``key`` an attack) or steps sweep (``clean`` or
    ``ATTACK@STEPS``)."""
    if res.get("kind") != "steps_sweep":
        return res["map50"][model][key]
    if key == "clean":
        return res["clean"][model]
    attack, steps = key.rsplit("@", 1)
    return res["map50"][model][attack][res["steps"].index(int(steps))]


def _group_records(records: Mapping[str, dict], groups: Mapping[str, list[str]],
                   group: str) -> tuple[list[dict], list[str]]:
    """The step files present of one group, and the names of its steps not run yet."""
    names = groups.get(group, [])
    return [records[n] for n in names if n in records], [n for n in names if n not in records]


def _rob_page(rep, records: Mapping[str, dict], out: Path, groups: Mapping[str, list[str]]) -> dict:
    from advdet.bench import intervals as ci
    from advdet.bench.reproduce_claims import robustdet_claims
    from advdet.bench.robustness_columns import ATTACK_LABELS, attack_label
    from advdet.bench.robustness_report import sweep_figure, sweep_rows, table_rows

    summary: dict = {"claims": []}
    present, missing = _group_records(records, groups, "table1")
    t1 = merge_model_steps(present)
    if t1 is not None:
        res, samples = t1
        # a claim compares models: with one of them missing it would be judged on the others only
        claims = robustdet_claims(res, {"cells": samples}) if res["intervals"] and not missing else []
        summary["claims"] = claims
        if missing:
            rep.add_text(f"Table 1 is partial, so no verdict is given yet: not run yet "
                         f"{', '.join(f'`{n}`' for n in missing)}.")
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
        rep.add_text("## Verdicts\n\nTable 1 (the steps the verdicts come from) has not run yet.")
    present, missing = _group_records(records, groups, "fig7_steps")
    f7 = merge_model_steps(present)
    if f7 is not None:
        res = f7[0]
        if missing:
            rep.add_text(f"Fig. 7 is partial: not run yet {', '.join(f'`{n}`' for n in missing)}.")
        for a in res["attacks"]:
            t = ci.sweep_interval_table(res, a)
            cols, rows = t if t is not None else sweep_rows(res, a)
            rep.add_table(f"Fig. 7: {attack_label(a)} against the number of steps, mAP50 (%)", cols, rows)
        _write_figure(out / "robustdet" / "fig7_steps.png", sweep_figure(res))
        rep.add_text("![mAP50 against attack steps](robustdet/fig7_steps.png)")
    else:
        rep.add_text("## Fig. 7a/b\n\nNot run yet.")
    return summary


def write_page(target: str, out: Path, steps: Sequence[Step], status: Mapping[str, str],
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
    lines = [f"**Command:** `{command}` (advdet {__version__}; resumable: every step is kept in `{target}/STEP.json` "
             "and reused when present).", "",
             f"- **Weights:** the {len(weights)} files in the table below, with their sha256",
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
                  [[m, _shown_file(w), w["sha256"] or "-"] for m, w in weights.items()])
    groups = step_groups(steps)
    summary = _rad_page(rep, records, out, groups) if target == "rad" else _rob_page(rep, records, out, groups)
    page = {"format": FORMAT, "target": target, "command": command, "written_utc": now_utc(), "wall_seconds": wall,
            "step_seconds": step_seconds, "steps": {s.name: {"file": f"{target}/{s.name}.json",
                                                             "status": status.get(s.name, "reused" if s.name in
                                                                                  records else "not run")}
                                                    for s in steps},
            "weights": weights, **summary}
    md_path, json_path = out / f"{target}.md", out / f"{target}.json"
    atomic_write_bytes(md_path, rep.to_markdown().encode("utf-8"))
    atomic_write_json(json_path, page, indent=1)
    return {**page, "md": str(md_path), "json": str(json_path)}
