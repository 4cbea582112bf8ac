"""`advdet eval`: COCO mAP of a model on a dataset.

A bad image, annotation file or weights file is a user error (``AdvdetError``): one line naming the
file and the item, exit status 2, from the CLI's handler in ``cli/app.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from advdet.cli.app import app, console, print_data_report, resolve_device
from advdet.cli.options import Device, WeightsFile


@app.command("eval")
def eval_cmd(model: str = typer.Option(..., help="Zoo name, torchvision:BUILDER, darknet:yolov3, "
                                       "ultralytics:YAML|FILE.pt or hf:CONFIG|DIR."),
             weights: WeightsFile = None,
             data: str = typer.Option("shapes-val", help="shapes-train, shapes-val, or an images folder."),
             ann: Optional[Path] = typer.Option(None, help="COCO instances JSON for an images folder."),
             size: Optional[int] = typer.Option(None, help="Letterbox size (default: the model's input size)."),
             limit: Optional[int] = typer.Option(None, min=1, help="Evaluate the first N images only."),
             batch_size: int = typer.Option(8, min=1, help="Images per forward pass."),
             json_out: Optional[Path] = typer.Option(None, "--json", help="Write the metrics as JSON."),
             predictions: Optional[Path] = typer.Option(None, help="Write detections in COCO results format."),
             device: Device = None,
             skip_bad: bool = typer.Option(False, help="Skip and count bad images instead of failing.")) -> None:
    """COCO box (and mask) mAP of a model on a COCO-format dataset."""
    from advdet.data.errors import DatasetError
    from advdet.data.io import atomic_write_json
    from advdet.data.registry import build_dataset
    from advdet.models.evaluate import predict_dataset, score_results
    from advdet.models.hub import get_model

    det = get_model(model, weights=weights)
    det.to(resolve_device(device))
    ds = build_dataset(data, ann, size=size or det.input_size, skip_bad=skip_bad)
    k = getattr(det, "num_classes", None)
    if k is not None and k != ds.num_classes:
        raise DatasetError(getattr(ds, "ann_file", data), f"{ds.num_classes} categories, but {model} predicts {k} "
                                                          "classes: evaluate it on data with its label space")
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
    if "segm_note" in out:
        console.print(f"note: {out['segm_note']}", markup=False, highlight=False, soft_wrap=True)
    out["data_report"] = ds.report.as_dict()
    print_data_report(out["data_report"])
    if json_out:
        atomic_write_json(json_out, out, indent=2)
    if predictions:
        atomic_write_json(predictions, results)


