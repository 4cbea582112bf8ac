"""The `advdet` command line: one Typer app (``app.py``); each module adds its commands to it.

Thin: the commands parse options, call the library (bench, training, ...) and print.
"""

from __future__ import annotations

from advdet.cli import data, demo, evaluate, zoo  # noqa: F401  (registers the commands)
from advdet.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
