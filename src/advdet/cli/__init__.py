"""The `advdet` command line: one Typer app (``app.py``); each module adds its commands to it.

Thin: the commands parse options, call the library (bench, training, ...) and print.
"""

from __future__ import annotations

from advdet.cli import data, demo, evaluate, zoo  # noqa: F401  (registers the commands)
from advdet.cli import attack, dataset  # noqa: F401  (advdet attack, advdet dataset)
from advdet.cli import analyze, bench_robustness  # noqa: F401  (advdet analyze, advdet bench robustness)
from advdet.cli import bench_transfer  # noqa: F401  (advdet bench transfer)
from advdet.cli import train  # noqa: F401  (advdet train)
from advdet.cli import explain  # noqa: F401  (advdet explain)
from advdet.cli import reproduce  # noqa: F401  (advdet reproduce)
from advdet.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
