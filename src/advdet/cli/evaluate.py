"""`advdet eval`: COCO mAP of a model on a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from advdet.cli.app import app, console, resolve_device


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
    from advdet.data.io import atomic_write_json
    from advdet.data.registry import build_dataset
    from advdet.models.evaluate import predict_dataset, score_results
    from advdet.models.zoo import build_model

    det = build_model(model, weights=weights)
    det.to(resolve_device(device))
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


