"""The output of a transfer benchmark: its JSON form, the RAD Table 3 layout and the report (tables, figures,
image grids)."""

from __future__ import annotations

import numpy as np

from advdet.bench.runtime import nan_to_none, percent
from advdet.bench.transfer_scores import mean_of

__all__ = ["json_ready", "transfer_table", "transfer_report"]


# ------------------------------------------------------------------------------------------------- output
def json_ready(result: dict) -> dict:
    """The result without its private keys (``_examples``, ``_row_specs``, ``_bootstrap_samples``), ready for
    ``json.dump`` (:func:`~advdet.bench.runtime.nan_to_none`: a missing number is ``null``)."""
    return nan_to_none({k: v for k, v in result.items() if not k.startswith("_")})


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
            mean_of([r["metrics"][v].get(metric) for v in r["black_box"]["victims"]])
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
        table = [[r["label"]] + [percent(r["metrics"][v].get(f"segm_{k}")) for k in ("map", "map50", "map75")
                                 for v in mask_victims] for r in rows]
        rep.add_table("Segmentation mAP (x100, RAD Table 4)", cols, table)
    # failure rates
    cols = ["attack"] + [f"{v} {k}" for v in victims for k in ("gone %", "mislab %", "new/img")]
    table = []
    for r in rows[1:]:
        cells: list = [r["label"]]
        for v in victims:
            f = r["failure"][v]
            cells += [percent(f["disappearance"]), percent(f["misclassification"]), f["hallucination"]]
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
                        percent(r["diagnostics"]["second_term_share"]), _rel(r["diagnostics"]),
                        r["diagnostics"]["mean_abs_delta"], percent(r["diagnostics"]["share_at_eps"])]
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
