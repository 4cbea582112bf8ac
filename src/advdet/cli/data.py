"""`advdet data`: generate the synthetic shapes benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from advdet.cli.app import console, data_app


def print_shapes_summary(summary: dict) -> None:
    table = Table(title=f"shapes benchmark (seed {summary['seed']}) in {summary['root']}")
    table.add_column("split")
    table.add_column("images", justify="right")
    table.add_column("objects", justify="right")
    table.add_column("small/medium/large", justify="right")
    table.add_column("image sides (px)")
    for split, s in summary["splits"].items():
        table.add_row(split, str(s["images"]), str(s["objects"]), f"{s['small']}/{s['medium']}/{s['large']}",
                      f"h {s['height_range'][0]}-{s['height_range'][1]}, w {s['width_range'][0]}-{s['width_range'][1]}")
    console.print(table)
    per_class = next(iter(summary["splits"].values()))["per_class"] if summary["splits"] else {}
    console.print("classes: " + ", ".join(f"{k} ({v})" for k, v in per_class.items()))


@data_app.command("shapes")
def data_shapes(out: Path = typer.Option(..., help="Output folder; train/ and val/ are written in COCO format."),
                train: int = typer.Option(4000, help="Number of training images."),
                val: int = typer.Option(500, help="Number of validation images."),
                seed: int = typer.Option(0, help="Seed: the same seed gives byte-identical files."),
                workers: Optional[int] = typer.Option(None, help="Worker processes (default: all cores)."),
                json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the summary as JSON.")) -> None:
    """Generate the synthetic shapes detection/segmentation benchmark."""
    from advdet.data.shapes import generate_shapes

    summary = generate_shapes(out, train, val, seed, workers)
    print_shapes_summary(summary)
    console.print(f"generated in {summary['seconds']} s")
    if json_out:
        json_out.write_text(json.dumps(summary, indent=2))


