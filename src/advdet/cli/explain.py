"""`advdet explain`: relevance figure of one image (RAD Fig. 1 / 5): the image with its predicted boxes,
the SGLRP maps of a few single boxes, and the Multi-Node SGLRP map of the top-m nodes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from advdet.cli.app import app, console, resolve_device
from advdet.cli.options import AllowUntrained, Device, Threads, WeightsFile, apply_threads
from advdet.data.errors import AdvdetError


def _fail(msg: str) -> None:
    raise AdvdetError(msg)  # one line and exit 2 from the CLI's handler (cli/app.py)


@app.command("explain")
def explain_cmd(
        model: str = typer.Option(..., help="Zoo name, torchvision:BUILDER, ultralytics:YAML|FILE.pt or "
                                  "hf:CONFIG|DIR."),
        image: Path = typer.Option(..., help="Image file (any format PIL reads; converted to RGB)."),
        out: Path = typer.Option(..., help="Output PNG."),
        weights: WeightsFile = None,
        nodes: int = typer.Option(20, help="m: the multi-node map is over the m most confident boxes."),
        boxes: int = typer.Option(3, help="Single boxes (distinct objects) that get their own SGLRP map."),
        node_type: str = typer.Option("cls", help="cls, loc or size (RAD Table 1)."),
        variant: str = typer.Option("paper", help="paper (eq. 2) or rad_code (RAD's reference code)."),
        size: Optional[int] = typer.Option(None, help="Letterbox size (default: the model's input size; "
                                           "torchvision:BUILDER models are built for it)."),
        num_classes: Optional[int] = typer.Option(None, help="Classes of a torchvision:BUILDER model "
                                                  "(default: its COCO layout)."),
        score_thresh: float = typer.Option(0.3, help="Draw the predicted boxes with at least this score."),
        device: Device = None,
        seed: int = typer.Option(0, help="Seed of the random init of models without weights."),
        threads: Threads = 0,
        untrained: AllowUntrained = False,
) -> None:
    """Relevance figure of one image: predictions, single-box SGLRP maps, Multi-Node SGLRP map."""
    import torch

    from advdet.data.reading import load_letterboxed
    from advdet.data.io import read_image_rgb
    from advdet.models.hub import get_model, is_external
    from advdet.relevance import NodeSelection, explain_image

    if nodes < 1 or boxes < 0:
        _fail(f"--nodes must be >= 1 and --boxes >= 0 (got {nodes}, {boxes})")
    if out.suffix.lower() != ".png":
        _fail(f"--out {out}: the figure is written as PNG; give a .png path")
    sel = NodeSelection(m=nodes, node_type=node_type)  # type: ignore[arg-type]
    if variant not in ("paper", "rad_code"):
        raise AdvdetError(f"--variant must be 'paper' or 'rad_code', got {variant!r}")
    arr, _ = read_image_rgb(image)
    apply_threads(threads)
    torch.manual_seed(seed)
    if is_external(model):
        det = get_model(model, weights=weights, num_classes=num_classes, input_size=size)
    else:
        det = get_model(model, weights=weights, pretrained=not untrained)
        if size is not None and size != det.input_size:
            raise AdvdetError(f"--size {size}: {model} takes {det.input_size} x {det.input_size} inputs")
    dev = resolve_device(device)
    det.to(dev).eval()
    x, _ = load_letterboxed(arr, det.input_size)
    names = getattr(det, "class_names", None)
    if names is None and not is_external(model):
        from advdet.data.shapes import SHAPE_CLASSES

        names = list(SHAPE_CLASSES) if det.num_classes == len(SHAPE_CLASSES) else None
    title = f"{model}: Multi-Node SGLRP of the top-{nodes} {node_type} nodes ({variant})"
    path = explain_image(det, x[None].to(dev), out, k=boxes, nodes=sel, variant=variant, class_names=names,
                         score_thresh=score_thresh, title=title)
    console.print(f"wrote {path} ({image.name}, {det.input_size} px, {boxes} single boxes, m = {nodes})",
                  highlight=False, soft_wrap=True)
