"""`advdet bench robustness`: the RobustDet Table 1 benchmark (and the PGD-steps sweep of Fig. 7a/b)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from advdet.cli.app import bench_app, console, print_data_report, resolve_device
from advdet.cli.options import SPEC_HELP, AllowUntrained, Device, SettingsOption, WeightsMap, attack_list
from advdet.cli.options import parse_weights as _parse_weights


def split_list(value: str, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise typer.BadParameter(f"empty {what} list")
    return items


def parse_weights(items: list[str], models: list[str]) -> dict[str, str]:
    """``--weights NAME=PATH`` (repeatable), or a bare PATH when only one model is benchmarked
    (``cli/options.parse_weights``)."""
    return _parse_weights(items, models)


def parse_steps(value: Optional[str]) -> list[int] | None:
    if value is None:
        return None
    try:
        steps = [int(v) for v in split_list(value, "steps")]
    except ValueError:
        raise typer.BadParameter(f"--steps {value!r}: expected an integer or a comma list of integers") from None
    if any(s < 1 for s in steps):
        raise typer.BadParameter(f"--steps {value!r}: step counts must be >= 1")
    return steps


@bench_app.command("robustness")
def robustness_cmd(
        models: str = typer.Option(..., help="Comma list of zoo names (first = baseline), e.g. "
                                             "ssd_vgg,ssd_vgg-mtd,robustdet."),
        attacks: str = typer.Option("clean,cls,loc,cwa,dag-robustdet",
                                    help="Comma list of columns: clean, cls (A_cls), loc (A_loc), cwa, "
                                    "dag-robustdet (RobustDet's DAG; dag is Xie's) or any registered detector "
                                    f"attack; each {SPEC_HELP} (e.g. cls:steps=5,technique=MI)."),
        data: str = typer.Option("shapes-val", help="shapes-val, a COCO-format folder (with --ann) or a VOC folder."),
        ann: Optional[Path] = typer.Option(None, help="COCO instances JSON for an images folder."),
        metric: str = typer.Option("auto", help="voc07 (VOC07 11-point AP50), coco50 (COCO AP50), or auto "
                                                "(voc07 for VOC folders, coco50 otherwise)."),
        limit: Optional[int] = typer.Option(None, help="Evaluate the first N images only."),
        eps: float = typer.Option(8.0, help="Linf budget of the PGD-family attacks, 0-255 units (step = eps)."),
        steps: Optional[str] = typer.Option(None, help="Attack iterations (default PGD 20, DAG 150); a comma "
                                                       "list (e.g. 1,5,10,20) runs the steps sweep of Fig. 7."),
        batch_size: int = typer.Option(8, help="Images per batch."),
        seed: int = typer.Option(0, help="Attack seed."),
        weights: WeightsMap = [],
        allow_untrained: AllowUntrained = False,
        set_: SettingsOption = [],
        voc_split: str = typer.Option("test", help="Split file of a VOC folder (ImageSets/Main/SPLIT.txt)."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON."),
        report: Optional[Path] = typer.Option(None, help="Write report.md and index.html into this folder."),
        device: Device = None,
        skip_bad: bool = typer.Option(False, help="Skip and count bad images instead of failing."),
        n_boot: int = typer.Option(1000, help="Bootstrap resamples of the images for the 95 % intervals of "
                                   "every cell and of each model's difference to the first."),
        no_ci: bool = typer.Option(False, "--no-ci", help="No bootstrap intervals (same as --n-boot 0)."),
        ci_seed: int = typer.Option(0, help="Seed of the bootstrap resamples.")) -> None:
    """White-box robustness of detectors, laid out like RobustDet Table 1 (mAP50 per model and attack)."""
    from advdet.bench.robustness import robustness_steps_sweep, robustness_table
    from advdet.bench.robustness_columns import attack_label
    from advdet.bench.robustness_report import robustness_report, sweep_rows, table_rows
    from advdet.data.io import atomic_write_json

    model_list = split_list(models, "models")
    split_list(attacks, "attacks")  # an empty list: its own message
    attack_names, attack_kwargs = attack_list(attacks, set_, extra_names=("clean",))
    step_list = parse_steps(steps)
    if n_boot < 0:
        raise typer.BadParameter(f"--n-boot must be >= 0, got {n_boot}")
    kw = dict(data=data, ann=ann, metric=metric, limit=limit, batch_size=batch_size, eps=eps, seed=seed,
              device=resolve_device(device), weights=parse_weights(weights, model_list),
              allow_untrained=allow_untrained, voc_split=voc_split, skip_bad=skip_bad,
              n_boot=0 if no_ci else n_boot, boot_seed=ci_seed, attack_kwargs=attack_kwargs or None)
    sweep = step_list is not None and len(step_list) > 1
    if sweep:
        result = robustness_steps_sweep(model_list, attack_names, steps=step_list, **kw)
    else:
        result = robustness_table(model_list, attack_names, steps=step_list[0] if step_list else None, **kw)

    from advdet.bench import intervals as ci
    from advdet.bench.robustness_columns import ATTACK_LABELS

    metric_name = "VOC07 mAP50" if result["metric"] == "voc07" else "COCO AP50"
    block = result.get("intervals")
    note = ci.interval_note(block) if block else None
    level = f"{100 * block['level']:g} %" if block else ""
    if sweep:
        for a in result["attacks"]:
            cols, rows = sweep_rows(result, a)
            _print_table(f"{attack_label(a)}: {metric_name} (%) against attack steps, eps {eps:g} "
                         f"({result['images']} images of {data})", cols, rows)
            if block:
                _print_table(f"{attack_label(a)}: {metric_name} (%) with {level} bootstrap intervals",
                             *ci.sweep_interval_table(result, a), caption=note)
    else:
        cols, rows = table_rows(result)
        _print_table(f"{metric_name} (%) under white-box attacks ({result['images']} images of {data})", cols, rows)
        if block:
            _print_table(f"{metric_name} (%) with {level} bootstrap intervals",
                         *ci.robustness_interval_table(result, ATTACK_LABELS), caption=note)
            paired = ci.robustness_paired_table(result, ATTACK_LABELS)
            if paired is not None:
                _print_table(f"Paired: each model minus {block['baseline']}, {metric_name} points "
                             "(same resamples)", *paired, caption=note)
    print_data_report(result.get("data_report"))
    if json_out:
        atomic_write_json(json_out, result, indent=2)
    if report:
        path = robustness_report(result).write(report)
        console.print(f"report: {path}")


def _print_table(title: str, cols: list[str], rows: list[list], caption: str | None = None) -> None:
    table = Table(title=escape(title), caption=None if caption is None else escape(caption))
    for i, c in enumerate(cols):
        table.add_column(escape(c), justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*["-" if v is None else (f"{v:.1f}" if isinstance(v, float) else escape(str(v))) for v in r])
    console.print(table)
