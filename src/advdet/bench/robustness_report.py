"""The presentation of a robustness result: table rows (with deltas against the first model), step-sweep
rows, figures and the report."""

from __future__ import annotations

from typing import Any

from advdet.bench.robustness_columns import ATTACK_LABELS, attack_label
from advdet.bench.runtime import percent

__all__ = ["table_rows", "sweep_rows", "table_figure", "sweep_figure", "robustness_report"]


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
            v = percent(result["map50"][m][a], 1)
            b = percent(result["map50"][base][a], 1)
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
            row.append(percent(result["clean"][m], 1))
        row += [percent(v, 1) for v in result["map50"][m][attack]]
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
        vals = [percent(result["map50"][m][a], 1) or 0.0 for a in attacks]
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
            ax.plot(result["steps"], [percent(v, 1) for v in result["map50"][m][a]], marker="o", label=m)
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
