"""The one Typer app ``advdet`` and what its command modules share (console, option parsing)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from advdet import __version__
from advdet.cli.options import Threads, apply_threads
from advdet.data.errors import AdvdetError

err_console = Console(stderr=True, soft_wrap=True)
_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/advdet


def _raised_in_advdet(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is advdet's own code (not torch, numpy, ...)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    try:
        return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)
    except (OSError, ValueError):
        return False


def user_error_message(err: BaseException) -> str | None:
    """The one line to print for a user error, or None for a bug (which keeps its traceback).

    User errors: ``AdvdetError`` (a bad file, name or option; the message names the file and the item),
    a missing or unreadable file (``OSError`` with a file name), and, until every check of the library
    raises ``AdvdetError``, a builtin ``ValueError`` raised by advdet's own code (its parameter checks)
    and a builtin ``KeyError`` raised by advdet's own code whose message is a sentence starting with
    "unknown " (the name lookups of ``models.zoo`` and ``training.methods``). Everything else is a bug:
    a ``KeyError('map')``, any ``TypeError``, a ``ValueError`` from inside torch or numpy.
    """
    if isinstance(err, AdvdetError):
        return str(err)
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}"
    if type(err) is ValueError and _raised_in_advdet(err):
        return str(err)
    if (type(err) is KeyError and len(err.args) == 1 and isinstance(err.args[0], str)
            and err.args[0].startswith("unknown ") and _raised_in_advdet(err)):
        return err.args[0]
    return None


def print_error(message: str) -> None:
    """``error: MESSAGE`` on stderr as one line: no rich markup (``[nan, 1]`` stays), no wrapping."""
    err_console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True, highlight=False)


class _AdvdetGroup(TyperGroup):
    """The root command: the one place where a user error becomes one line and exit status 2.

    Every subcommand runs inside its ``invoke``. ``ADVDET_TRACEBACK=1`` shows the traceback of user
    errors too.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as err:
            message = None if os.environ.get("ADVDET_TRACEBACK") else user_error_message(err)
            if message is None:
                raise
            print_error(message)
            raise typer.Exit(2) from None


app = typer.Typer(cls=_AdvdetGroup, help="advdet: adversarial robustness of object detectors (RAD, RobustDet).",
                  no_args_is_help=True, add_completion=False)
data_app = typer.Typer(help="Datasets: generate the synthetic shapes benchmark.", no_args_is_help=True)
app.add_typer(data_app, name="data")
zoo_app = typer.Typer(help="The model zoo: list, train, document and compact the shipped models.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
bench_app = typer.Typer(help="Benchmarks: transfer tables (RAD) and robustness tables (RobustDet).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")
analyze_app = typer.Typer(help="Analyses of RobustDet section 3.2 (loss change, gradient entanglement, "
                          "confidence) and of RAD's premise (relevance-map similarity between detectors).",
                          no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")
console = Console()
if not console.is_terminal and "COLUMNS" not in os.environ:
    # piped output (logs, CI, `| tee`): rich would assume 80 columns and truncate the names in the
    # benchmark and zoo tables; they need about 110-130
    console.width = max(console.width, 140)


def _version(value: bool) -> None:
    if value:
        console.print(f"advdet {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
          threads: Threads = 0) -> None:
    """``--threads`` here applies to every command (``cli/options.py`` defines the shared options)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    apply_threads(threads)


def parse_overrides(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items of ``advdet train`` / ``advdet zoo train`` (recipe and config fields; values
    parsed as JSON when they are JSON). Attack settings have their own grammar: ``advdet.attacks.spec``."""
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




def print_data_report(report: dict | None) -> None:
    """The lines of a stored data report (``DataReport.as_dict``): counts, then every skipped, dropped and
    converted item; rich markup off, so bracketed text such as ``bbox [nan, 1, 2, 3]`` is printed as is."""
    from advdet.data.errors import DataReport

    for line in DataReport.from_dict(report).lines():
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def resolve_device(device: str | None):
    """``--device`` value, or CUDA when present, else CPU."""
    import torch

    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
