"""`advdet reproduce rad|robustdet`: regenerate the analogues of the papers' tables from the shipped zoo,
resumably (``advdet.bench.reproduce``); writes OUT/TARGET.md, OUT/TARGET.json and OUT/TARGET/STEP.json."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from advdet.cli.app import app, console, resolve_device
from advdet.cli.options import Device


@app.command("reproduce")
def reproduce_cmd(
        target: str = typer.Argument(..., help="rad (RAD Tables 1-5, Fig. 7, leave-one-out ensembles) or "
                                               "robustdet (RobustDet Table 1, Fig. 7a/b)."),
        limit: Optional[int] = typer.Option(None, help="Images of shapes-val (default: rad 200, robustdet 100)."),
        out: Path = typer.Option(Path("docs/results"), help="Folder of the pages (TARGET.md, TARGET.json) and of "
                                 "the step files (TARGET/STEP.json, reused when present)."),
        steps: Optional[str] = typer.Option(None, help="Comma list of steps or groups of steps to run (default "
                                            "all; rad: table3 and the groups table1_node_type (_loc, _size), "
                                            "table2_technique (_none, _DI, _TI), fig7_eps (_4, _8, _12), "
                                            "ensembles (leave-one-out); robustdet: the groups table1 and fig7_steps, "
                                            "one step per model: table1_ssd_vgg, fig7_steps_robustdet, ...)."),
        batch_size: int = typer.Option(8, help="Images per batch."),
        seed: int = typer.Option(0, help="Attack seed."),
        n_boot: int = typer.Option(1000, help="Bootstrap resamples of the images for the intervals and verdicts."),
        jobs: int = typer.Option(1, min=1, help="Steps computed at once, each in its own process with the torch "
                                 "threads shared out (2 on a 2-core machine: every step is seeded on its own, "
                                 "so the files are the same)."),
        device: Device = None) -> None:
    """Regenerate a paper's tables from the shipped zoo, with a verdict per claim (holds / fails / undecided
    from 95 % bootstrap intervals). Resumable: a step whose JSON is in OUT is not computed again."""
    from advdet.bench.reproduce import reproduce, reproduce_command
    from advdet.bench.reproduce_steps import DEFAULT_LIMITS, TARGETS

    if target not in TARGETS:
        raise typer.BadParameter(f"{target!r}: choose one of {', '.join(TARGETS)}", param_hint="TARGET")
    step_list = [s.strip() for s in steps.split(",") if s.strip()] if steps else None
    extra = []
    for flag, value, default in (("--batch-size", batch_size, 8), ("--seed", seed, 0), ("--n-boot", n_boot, 1000)):
        if value != default:
            extra += [flag, str(value)]
    n = limit if limit is not None else DEFAULT_LIMITS[target]
    command = reproduce_command(target, limit=n, out=out, steps=step_list, extra=extra, jobs=jobs)

    def on_step(name: str, status: str, seconds: float) -> None:
        console.print(f"{name}: {status} ({seconds:.0f} s)", markup=False, highlight=False)

    page = reproduce(target, out, limit=n, steps=step_list, seed=seed, batch_size=batch_size, n_boot=n_boot,
                     device=resolve_device(device), command=command, jobs=jobs, on_step=on_step)
    table = Table(title=f"advdet reproduce {target}: verdicts")
    for c in ("claim", "value [95 % interval]", "verdict"):
        table.add_column(c)
    for c in page.get("claims", []):
        ci = c["interval"]
        if ci is not None and ci.get("value") is not None:
            scale = 100.0
            txt = f"{scale * ci['value']:.1f}" + ("" if ci.get("lo") is None else
                                                 f" [{scale * ci['lo']:.1f}, {scale * ci['hi']:.1f}]")
        else:
            txt = f"{len(c['parts'])} parts"
        table.add_row(c["id"], txt, c["verdict"])
    for g in page.get("goal", []):
        table.add_row(f"goal: halve every black-box victim ({g['attack']})", f"worst: {g['worst'] or '-'}",
                      g["verdict"])
    console.print(table)
    console.print(f"wrote {page['md']} and {page['json']} in {page['wall_seconds']:.0f} s", markup=False,
                  highlight=False)
