"""`advdet demo`: the main job on the embedded default."""

from __future__ import annotations

from advdet.cli.app import app
from advdet.cli.data import print_shapes_summary


@app.command()
def demo() -> None:
    """The main job on the embedded default (for now: make sure the shapes benchmark exists, summarise it)."""
    from advdet.data.io import read_json
    from advdet.data.shapes import ensure_default_shapes

    root = ensure_default_shapes()
    print_shapes_summary(read_json(root / "shapes.json"))


