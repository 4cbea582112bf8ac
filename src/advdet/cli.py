"""The `advdet` command line: one Typer app; thin, it parses, calls the library and prints."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from advdet import __version__

app = typer.Typer(help="advdet: adversarial robustness of object detectors (RAD, RobustDet).",
                  no_args_is_help=True, add_completion=False)
data_app = typer.Typer(help="Datasets: generate the synthetic shapes benchmark.", no_args_is_help=True)
app.add_typer(data_app, name="data")
zoo_app = typer.Typer(help="The model zoo: list and reproduce the shipped models.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
console = Console()


def _version(value: bool) -> None:
    if value:
        console.print(f"advdet {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


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


@app.command()
def demo() -> None:
    """The main job on the embedded default (for now: make sure the shapes benchmark exists, summarise it)."""
    from advdet.data.io import read_json
    from advdet.data.shapes import ensure_default_shapes

    root = ensure_default_shapes()
    print_shapes_summary(read_json(root / "shapes.json"))


@zoo_app.command("list")
def zoo_list(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Name, family, parameters, input size, classes, shapes-val mAP and file size of each zoo model."""
    from advdet.models.zoo import ZOO_INPUT_SIZE, zoo_entries

    rows = []
    for e in zoo_entries():
        card = e.card
        params = card.get("parameters")
        if params is None:
            params = sum(p.numel() for p in e.builder().parameters())
        val = card.get("shapes_val", {})
        rows.append({"name": e.name, "family": e.family, "kind": e.kind, "parameters": params, "top1": val.get("top1"),
                     "input_size": card.get("input_size", ZOO_INPUT_SIZE), "classes": card.get("num_classes", 8),
                     "map": val.get("map"), "map50": val.get("map50"), "map75": val.get("map75"),
                     "file_size": card.get("file_size"), "trained": e.trained})
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title="advdet zoo (trained on shapes-train, evaluated on shapes-val)")
    for col in ("name", "family", "params", "input", "classes", "mAP", "mAP50", "mAP75", "top-1", "size"):
        table.add_column(col, justify="left" if col in ("name", "family") else "right")

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    for r in rows:
        size = "not trained" if r["file_size"] is None else f"{r['file_size'] / 1e6:.1f} MB"
        table.add_row(r["name"], r["family"], f"{r['parameters'] / 1e6:.2f}M", str(r["input_size"]),
                      str(r["classes"]), f(r["map"]), f(r["map50"]), f(r["map75"]), f(r["top1"]), size)
    console.print(table)


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


@zoo_app.command("train")
def zoo_train(name: str = typer.Argument(..., help="Zoo entry to reproduce."),
              out: Optional[Path] = typer.Option(None, help="Where to write NAME.safetensors and NAME.json "
                                                 "(default: the package's zoo_weights)."),
              run_dir: Optional[Path] = typer.Option(None, help="Checkpoint folder (default $ADVDET_HOME/runs/NAME)."),
              resume: bool = typer.Option(False, help="Continue from the last checkpoint."),
              set_: list[str] = typer.Option([], "--set", help="Override a recipe field, e.g. --set epochs=2."),
              threads: Optional[int] = typer.Option(None, help="torch CPU threads.")) -> None:
    """Reproduce a zoo entry from its recipe with a fixed seed (train, evaluate, write weights + card)."""
    from advdet.training.zoo_train import train_zoo_model

    card = train_zoo_model(name, out_dir=out, run_dir=run_dir, resume=resume, overrides=_parse_overrides(set_),
                           threads=threads)
    v = card["shapes_val"]
    score = (f"top-1 {v['top1']:.3f}" if "top1" in v else
             f"mAP {v['map']:.3f}, mAP50 {v['map50']:.3f}, mAP75 {v['map75']:.3f}")
    console.print(f"{name}: shapes-val {score}; {card['training_seconds']:.0f} s training; "
                  f"weights {card['file']} ({card['file_size'] / 1e6:.1f} MB)")


@app.command("eval")
def eval_cmd(model: str = typer.Option(..., help="Zoo name or torchvision:BUILDER."),
             weights: Optional[Path] = typer.Option(None, help="Weights file (default: the zoo's)."),
             data: str = typer.Option("shapes-val", help="shapes-train, shapes-val, or an images folder."),
             ann: Optional[Path] = typer.Option(None, help="COCO instances JSON for an images folder."),
             size: Optional[int] = typer.Option(None, help="Letterbox size (default: the model's input size)."),
             limit: Optional[int] = typer.Option(None, help="Evaluate the first N images only."),
             batch_size: int = typer.Option(8, help="Images per forward pass."),
             json_out: Optional[Path] = typer.Option(None, "--json", help="Write the metrics as JSON."),
             predictions: Optional[Path] = typer.Option(None, help="Write detections in COCO results format."),
             device: Optional[str] = typer.Option(None, help="cuda or cpu (default: cuda when present)."),
             skip_bad: bool = typer.Option(False, help="Skip and count bad images instead of failing.")) -> None:
    """COCO box (and mask) mAP of a model on a COCO-format dataset."""
    import torch

    from advdet.data.io import atomic_write_json
    from advdet.data.registry import build_dataset
    from advdet.models.evaluate import predict_dataset, score_results
    from advdet.models.zoo import build_model

    det = build_model(model, weights=weights)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    det.to(dev)
    ds = build_dataset(data, ann, size=size or det.input_size, skip_bad=skip_bad)
    results, ids = predict_dataset(det, ds, batch_size, limit)
    out = {"model": model, "data": data,
           **score_results(ds.coco_gt, results, ids, getattr(det, "has_masks", False))}
    table = Table(title=f"{model} on {data} ({len(ids)} images)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in out.items():
        if isinstance(v, float):
            table.add_row(k, f"{v:.4f}")
    console.print(table)
    if ds.report.num_skipped or ds.report.clipped_boxes or ds.report.dropped_zero_area:
        console.print(f"data report: {ds.report.as_dict()}")
    if json_out:
        atomic_write_json(json_out, out, indent=2)
    if predictions:
        atomic_write_json(predictions, results)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
