"""`advdet zoo`: list and reproduce the shipped models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from advdet.cli.app import console, parse_overrides, zoo_app
from advdet.cli.options import Threads


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
        val = card.get("shapes_val") or card.get("procedural_val") or {}
        default_size = e.data["size"] if e.data else ZOO_INPUT_SIZE
        rows.append({"name": e.name, "family": e.family, "kind": e.kind, "parameters": params, "top1": val.get("top1"),
                     "input_size": card.get("input_size", default_size), "classes": card.get("num_classes", 8),
                     "map": val.get("map"), "map50": val.get("map50"), "map75": val.get("map75"),
                     "file_size": card.get("file_size"), "trained": e.trained})
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title="advdet zoo (trained on shapes-train, evaluated on shapes-val)")
    for col in ("name", "family", "params", "input", "classes", "mAP", "mAP50", "mAP75", "top-1", "size"):
        table.add_column(col, justify="left" if col in ("name", "family") else "right", no_wrap=True)

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    for r in rows:
        size = "not trained" if r["file_size"] is None else f"{r['file_size'] / 1e6:.1f} MB"
        table.add_row(r["name"], r["family"], f"{r['parameters'] / 1e6:.2f}M", str(r["input_size"]),
                      str(r["classes"]), f(r["map"]), f(r["map50"]), f(r["map75"]), f(r["top1"]), size)
    total = sum(r["file_size"] or 0 for r in rows)
    table.caption = f"shipped weights: {total / 1e6:.1f} MB in all"
    console.print(table)


@zoo_app.command("train")
def zoo_train(name: str = typer.Argument(..., help="Zoo entry to reproduce."),
              out: Optional[Path] = typer.Option(None, help="Where to write NAME.safetensors and NAME.json "
                                                 "(default: the package's zoo_weights)."),
              run_dir: Optional[Path] = typer.Option(None, help="Checkpoint folder (default $ADVDET_HOME/runs/NAME)."),
              resume: bool = typer.Option(False, help="Continue from the last checkpoint."),
              set_: list[str] = typer.Option([], "--set", help="Override a recipe field, e.g. --set epochs=2."),
              threads: Threads = 0,
              device: str = typer.Option("cpu", help="Train on cpu or cuda (evaluation runs on the CPU)."),
              workers: int = typer.Option(1, help="Processes that render the procedural pretraining set "
                                          "(backbone entries; the same images for any count).")) -> None:
    """Reproduce a zoo entry from its recipe with a fixed seed (train, evaluate, write weights + card)."""
    from advdet.training.zoo_train import train_zoo_model

    card = train_zoo_model(name, out_dir=out, run_dir=run_dir, resume=resume, overrides=parse_overrides(set_),
                           threads=threads, device=device, workers=workers)
    split = "shapes-val" if "shapes_val" in card else "procedural-val"
    v = card.get("shapes_val") or card.get("procedural_val")
    score = (f"top-1 {v['top1']:.3f}" + (f", top-5 {v['top5']:.3f}" if "top5" in v else "") if "top1" in v else
             f"mAP {v['map']:.3f}, mAP50 {v['map50']:.3f}, mAP75 {v['map75']:.3f}")
    console.print(f"{name}: {split} {score}; {card['training_seconds']:.0f} s training; "
                  f"weights {card['file']} ({card['file_size'] / 1e6:.1f} MB)")


@zoo_app.command("docs")
def zoo_docs(out: Path = typer.Option(Path("docs/zoo.md"), help="The page to write."),
             zoo_dir: Optional[Path] = typer.Option(None, help="Folder of cards and weights (default: the "
                                                    "package's zoo_weights)."),
             check: bool = typer.Option(False, "--check", help="Write nothing; exit 1 when OUT differs from "
                                        "what the cards give.")) -> None:
    """Write docs/zoo.md from the zoo's model cards (table, metrics, recipes, sha256 of every weight file)."""
    from advdet.data.io import atomic_write_bytes
    from advdet.models.zoo_docs import zoo_markdown

    page = zoo_markdown(zoo_dir)
    if check:
        if not out.is_file() or out.read_text() != page:
            console.print(f"{out} is stale: rerun `advdet zoo docs --out {out}`", markup=False)
            raise typer.Exit(1)
        console.print(f"{out} matches the cards", markup=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, page.encode())
    console.print(f"wrote {out} ({page.count(chr(10))} lines)", markup=False)


@zoo_app.command("compact")
def zoo_compact(names: list[str] = typer.Argument(None, help="Zoo entries (default: every trained entry)."),
                out: Optional[Path] = typer.Option(None, help="Where to write NAME.safetensors and NAME.json "
                                                   "(default: the package's zoo_weights)."),
                threads: Threads = 0) -> None:
    """Store shipped weights in their entry's storage dtype (float16; int8 for the robust entries) and
    re-measure their cards (old metrics kept as shapes_val_OLDDTYPE)."""
    import torch

    from advdet.models.zoo import zoo_entries
    from advdet.training.zoo_train import compact_zoo_model

    if threads:
        torch.set_num_threads(threads)
    for name in names or [e.name for e in zoo_entries() if e.trained]:
        card = compact_zoo_model(name, out_dir=out)
        old = card.get("compacted_from", "float32")
        before, after = card.get(f"shapes_val_{old}") or {}, card["shapes_val"]
        key = "top1" if "top1" in after else "map50"
        console.print(f"{name}: {card['dtype']} {card['file_size'] / 1e6:.1f} MB; shapes-val {key} "
                      f"{before.get(key, float('nan')):.4f} ({old}) -> {after[key]:.4f}")
