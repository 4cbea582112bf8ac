"""`advdet demo`: the main job on the embedded default (``make demo``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from advdet.cli.app import app, console, resolve_device
from advdet.cli.options import SPEC_HELP, Device, SettingsOption, Threads, apply_threads, attack_list


@app.command()
def demo(out: Path = typer.Option(Path("advdet-report"), help="Folder of the report (report.md, index.html)."),
         limit: Optional[int] = typer.Option(None, help="Images of shapes-val for the transfer table "
                                             "(default 8: keeps the demo under 5 minutes on 2 CPU cores)."),
         robust_limit: Optional[int] = typer.Option(None, help="Images for the robustness table (default 4)."),
         robust_steps: Optional[int] = typer.Option(None, help="Iterations of every attack in the robustness table "
                                                    "(default 5; RobustDet's are 20 PGD / 150 DAG)."),
         batch_size: int = typer.Option(8, help="Images per batch."),
         seed: int = typer.Option(0, help="Attack seed."),
         attacks: Optional[str] = typer.Option(None, help=f"Attacks of the transfer table, comma list (default "
                                               f"rad,cls-pgd,dag-eps,dfool,loc-shift); each {SPEC_HELP}."),
         set_: SettingsOption = [],
         device: Device = None,
         threads: Threads = 0,
         json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON.")) -> None:
    """The main job: transfer table (RAD and baselines from the yolov3 surrogate against every trained zoo
    detector) and robustness table (robust zoo models), printed and written as a report."""
    import time

    from advdet.bench.demo import (DEMO_ATTACKS, DEMO_LIMIT, DEMO_ROBUST_LIMIT, DEMO_ROBUST_STEPS, DEMO_SURROGATE,
                                   run_demo)
    from advdet.bench.transfer_report import json_ready
    from advdet.cli.bench_transfer import print_transfer
    from advdet.data.io import atomic_write_json
    from advdet.data.shapes import ensure_default_shapes

    t0 = time.perf_counter()
    apply_threads(threads)
    chosen = {}
    if attacks is not None or set_:  # one line naming the attack and the bad key or value
        names, kwargs = attack_list(attacks or ",".join(DEMO_ATTACKS), set_, allow_unknown=True)  # skipped, noted
        chosen = {"attacks": tuple(names), "attack_kwargs": kwargs}
    n = limit or DEMO_LIMIT
    with console.status("making sure the shapes benchmark exists ..."):
        root = ensure_default_shapes()
    console.print(f"shapes benchmark: {root}")
    shown = ", ".join(chosen.get("attacks", DEMO_ATTACKS))
    console.print(f"[bold]advdet demo[/]: transfer from {DEMO_SURROGATE} ({escape(shown)}; eps 16) "
                  f"on {n} shapes-val images, then the robustness table; report -> {out}")
    result = run_demo(out, limit=n, robust_limit=robust_limit or DEMO_ROBUST_LIMIT,
                      robust_steps=robust_steps or DEMO_ROBUST_STEPS, batch_size=batch_size, seed=seed,
                      device=resolve_device(device), note=lambda m: console.print(f"[yellow]{escape(m)}[/]"),
                      **chosen)
    if result["transfer"] is not None:
        print_transfer({**result["transfer"], "skipped": [], "notes": result["transfer"]["notes"]}, console)
    if result["robustness"] is not None:
        from advdet.bench.robustness_report import table_rows
        from rich.table import Table

        rob = result["robustness"]
        cols, rows = table_rows(rob)
        t = Table(title=f"Robustness: mAP50 (%) under white-box attacks ({rob['images']} images of {rob['data']})")
        for i, c in enumerate(cols):
            t.add_column(c, justify="left" if i == 0 else "right")
        for r in rows:
            t.add_row(*["-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v)) for v in r])
        console.print(t)
    if json_out:
        atomic_write_json(json_out, {"transfer": None if result["transfer"] is None else json_ready(result["transfer"]),
                                     "robustness": result["robustness"], "notes": result["notes"]}, indent=2)
    if result["report"]:
        console.print(f"report: {Path(result['report']) / 'index.html'}")
    console.print(f"demo finished in {time.perf_counter() - t0:.0f} s")
