"""`advdet bench transfer`: the transfer table of RAD section 4 (Table 3 layout), sweeps, report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from advdet.cli.app import bench_app, console, print_data_report, resolve_device
from advdet.cli.options import SPEC_HELP, AllowUntrained, Device, SettingsOption, WeightsMap, attack_list
from advdet.cli.options import parse_weights as _parse_weights

#: RAD Table 3's detection baselines (its "Loc" row is ``loc-shift``; ``loc`` is A_loc) and RAD
DEFAULT_ATTACKS = "cls-pgd,dag-eps,dfool,loc-shift,rad"


def _split(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def parse_eps(text: str) -> float | list[float]:
    """``16`` -> 16.0; ``4,8,12,16`` -> [4.0, 8.0, 12.0, 16.0] (the eps sweep)."""
    try:
        vals = [float(v) for v in _split(text)]
    except ValueError:
        raise typer.BadParameter(f"--eps expects a number or a comma list of numbers, got {text!r}") from None
    if not vals:
        raise typer.BadParameter("--eps is empty")
    return vals[0] if len(vals) == 1 else vals


def parse_sizes(items: list[str], names: list[str]) -> dict[str, int]:
    """``416`` -> every external (``torchvision:`` / ``darknet:``) model in ``names`` at 416;
    ``torchvision:X=448`` -> that model."""
    from advdet.models.zoo import is_external

    out: dict[str, int] = {}
    for item in items:
        name, eq, val = item.rpartition("=")
        try:
            s = int(val)
        except ValueError:
            raise typer.BadParameter(f"--size expects S or MODEL=S, got {item!r}") from None
        if eq:
            out[name] = s
        else:
            out.update({n: s for n in names if is_external(n) and n not in out})
    return out


def _fmt(v, scale: float = 100.0) -> str:
    return "-" if v is None or (isinstance(v, float) and v < 0) else f"{v * scale:.1f}"


def print_transfer(result: dict, out: Console | None = None, metric: str = "map") -> None:
    """Print a transfer result as RAD Table 3 (metric x 100; white-box cells marked ``*``) and the mean
    black-box failure rates per attack."""
    out = out or console
    victims = result["victims"]
    name = {"map": "box mAP", "map50": "box mAP50", "map75": "box mAP75"}.get(metric, metric)
    surs = ", ".join(result["surrogates"]) or "-"
    if result.get("leave_one_out"):
        surs += f"; leave-one-out over {', '.join(result['leave_one_out'])}"
    t = Table(title=f"Transfer {name} x100 on {result['data']} ({result['images']} images, eps {result['eps']}; "
                    f"surrogate {surs}, classifier attacks on {result['classifier']})")
    t.add_column("attack")
    for v in victims:
        t.add_column(v, justify="right")
    t.add_column("black-box mean", justify="right", style="bold")
    t.add_column("RMSE", justify="right")
    for r in result["rows"]:
        cells = []
        for v in victims:
            s = _fmt(r["metrics"][v].get(metric))
            if r["white_box"] is not None and r["white_box"]["victim"] == v:
                s += "*"
            cells.append(s)
        bb = r["black_box"].get(metric)
        t.add_row(r["label"], *cells, _fmt(bb), f"{r['perturbation']['rmse']:.2f}",
                  end_section=r["label"] == "Ablation")
    out.print(t)
    print_intervals(result, out)
    f = Table(title=f"How detections fail (mean over black-box victims, all victims when there is none; "
                    f"score >= {result['score_thresh']}, "
                    f"IoU >= {result['iou']}, against each victim's clean predictions)")
    for c in ("attack", "disappeared %", "misclassified %", "hallucinated / image", "craft s"):
        f.add_column(c, justify="left" if c == "attack" else "right")
    for r in result["rows"][1:]:
        bb = [v for v in r["black_box"]["victims"] if v != r["surrogate"]] or victims
        vals = {}
        for k in ("disappearance", "misclassification", "hallucination"):
            xs = [r["failure"][v][k] for v in bb if r["failure"][v][k] is not None]
            vals[k] = sum(xs) / len(xs) if xs else None
        f.add_row(r["label"], _fmt(vals["disappearance"]), _fmt(vals["misclassification"]),
                  _fmt(vals["hallucination"], 1.0), f"{r['seconds']['craft']:.1f}")
    out.print(f)
    for s in result.get("skipped", []):
        out.print(f"[yellow]skipped:[/] {escape(str(s))}")
    for s in result.get("notes", []):
        out.print(f"[dim]note: {escape(str(s))}[/]")


def print_intervals(result: dict, out: Console | None = None) -> None:
    """Print the bootstrap intervals of a transfer result (box mAP50, black-box means, paired differences)."""
    from advdet.bench.intervals import interval_note, transfer_interval_table, transfer_paired_table

    out = out or console
    table = transfer_interval_table(result)
    if table is None:
        return
    block = result["bootstrap"]
    for title, tab in ((f"box mAP50 x100 with {100 * block['level']:g} % bootstrap intervals", table),
                       (f"Paired: {block['reference']} minus each baseline, box mAP50 x100 (same resamples; "
                        f"black-box mean over the {block['reference']} row's black-box victims)",
                        transfer_paired_table(result))):
        if tab is None:
            continue
        cols, rows = tab
        t = Table(title=escape(title), caption=escape(interval_note(block)))
        for i, c in enumerate(cols):
            t.add_column(escape(c), justify="left" if i < (2 if "Paired" in title else 1) else "right")
        for r in rows:
            t.add_row(*["-" if c is None else escape(str(c)) for c in r])
        out.print(t)


@bench_app.command("transfer")
def bench_transfer(
        surrogate: Optional[str] = typer.Option(None, help="Detector(s) that craft the detection attacks, comma "
                                                "list of separate surrogates; a+b+c is ONE ensemble that "
                                                "averages the attack over its members (default: yolov3, none "
                                                "with --leave-one-out)."),
        attacks: str = typer.Option(DEFAULT_ATTACKS, help=f"Attacks, comma list; each {SPEC_HELP}. Ablation "
                                    "(gaussian) and No Attack rows are always added."),
        victims: Optional[str] = typer.Option(None, help="Victim models, comma list "
                                              "(default: every trained zoo detector)."),
        data: str = typer.Option("shapes-val", help="shapes-val, shapes-train, or a COCO-format images folder."),
        ann: Optional[Path] = typer.Option(None, help="COCO instances JSON for an images folder."),
        eps: str = typer.Option("16", help="Linf budget in 0-255 units; a comma list is the eps sweep (RAD Fig. 7)."),
        limit: Optional[int] = typer.Option(None, help="Use the first N images only."),
        batch_size: int = typer.Option(8, help="Images per attack / forward batch."),
        seed: int = typer.Option(0, help="Attack seed (per-batch seeds as in advdet attack: advdet.attacks.seeding)."),
        sweep: Optional[str] = typer.Option(None, help="nodes (Table 7), technique (Table 2), node_type (Table 1) "
                                            "or eps; applies to the attacks that have the parameter (RAD)."),
        sweep_values: Optional[str] = typer.Option(None, help="Comma list of sweep values (defaults: nodes "
                                                   "static:10,static:20,static:30,dynamic:-1,dynamic:-2,dynamic:-3; "
                                                   "technique none,DI,TI,SI,MI; node_type size,loc,cls)."),
        classifier: str = typer.Option("classifier", help="Surrogate of the classifier attacks (cls-*)."),
        set_: SettingsOption = [],
        weights: WeightsMap = [],
        size: list[str] = typer.Option([], help="Letterbox size of torchvision: models: S (all of them) or "
                                       "MODEL=S (repeatable); default the builder's. RAD: 416."),
        allow_untrained: AllowUntrained = False,
        skip_unavailable: bool = typer.Option(False, help="Skip unknown attacks and untrained models with a note."),
        use_gt: bool = typer.Option(False, help="Give the attacks the ground truth (default: clean predictions)."),
        metric: str = typer.Option("map", help="Metric of the printed table: map, map50 or map75."),
        examples: int = typer.Option(2, help="Images shown as grids in the report."),
        relevance: bool = typer.Option(True, help="Relevance maps before/after in the report's grids."),
        report: Optional[Path] = typer.Option(None, help="Write report.md, index.html and figures to this folder."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full result as JSON."),
        device: Device = None,
        skip_bad: bool = typer.Option(False, help="Skip and count bad images instead of failing."),
        n_boot: int = typer.Option(1000, help="Bootstrap resamples of the images for the 95 % intervals of "
                                   "mAP50 and the paired RAD - baseline differences."),
        no_ci: bool = typer.Option(False, "--no-ci", help="No bootstrap intervals (same as --n-boot 0)."),
        ci_seed: int = typer.Option(0, help="Seed of the bootstrap resamples."),
        paired_with: str = typer.Option("rad", help="Attack whose rows are compared, pairwise, with every "
                                        "baseline row."),
        leave_one_out: bool = typer.Option(False, "--leave-one-out", help="Per detector attack, attack every "
                                           "victim with the ensemble of the other victims (rows 'ens-ATTACK "
                                           "without VICTIM'; black-box number: that victim). Ensemble options "
                                           "in the spec: ATTACK:weights=loss|equal|[w,...],normalize=false.")) -> None:
    """Transfer table (RAD Table 3): craft once per (surrogate, attack), evaluate every victim."""
    from advdet.bench.demo import trained_detectors
    from advdet.bench.transfer import transfer_matrix
    from advdet.bench.transfer_report import json_ready, transfer_report
    from advdet.data.errors import AdvdetError
    from advdet.data.io import atomic_write_json

    if metric not in ("map", "map50", "map75"):
        raise typer.BadParameter(f"--metric must be map, map50 or map75, got {metric!r}")
    eps_v = parse_eps(eps)
    if n_boot < 0:
        raise typer.BadParameter(f"--n-boot must be >= 0, got {n_boot}")
    victim_list = _split(victims) or trained_detectors()
    if not victim_list:
        raise AdvdetError("no trained zoo detector to use as victim; pass --victims "
                          "(and --allow-untrained for random weights)")
    surrogates = _split(surrogate) if surrogate is not None else ([] if leave_one_out else ["yolov3"])
    # one line naming the attack and the bad key or value (unknown names: skipped with --skip-unavailable)
    attack_names, attack_kwargs = attack_list(attacks, set_, allow_unknown=skip_unavailable)
    models = list(dict.fromkeys([m for s in surrogates for m in s.split("+")] + victim_list + [classifier]))
    result = transfer_matrix(
        surrogates, attack_names, victim_list, data, ann=ann, eps=eps_v, limit=limit,
        batch_size=batch_size, seed=seed, device=resolve_device(device),
        attack_kwargs=attack_kwargs, weights=_parse_weights(weights, models, check_files=False), sweep=sweep,
        sizes=parse_sizes(size, [m for s in surrogates for m in s.split("+")] + victim_list + [classifier]),
        sweep_values=_split(sweep_values) or None, classifier=classifier, allow_untrained=allow_untrained,
        skip_unavailable=skip_unavailable, examples=examples if report else 0, relevance=relevance,
        skip_bad=skip_bad, use_gt=use_gt, progress=True, n_boot=0 if no_ci else n_boot, boot_seed=ci_seed,
        paired_with=paired_with, leave_one_out=leave_one_out)
    print_transfer(result, console, metric)
    print_data_report(result.get("data_report"))
    if json_out:
        atomic_write_json(json_out, json_ready(result), indent=2)
        console.print(f"JSON: {json_out}")
    if report:
        out = transfer_report(result).write(report)
        console.print(f"report: {out / 'index.html'}")
