"""The layer rule (README, DESIGN.md): imports only go up the list data -> metrics -> models -> relevance ->
attacks -> training -> bench -> cli. Checked on the AST of every module under src/advdet, lazy imports
inside functions included. Also the size rule (issue 23): no source file over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LAYERS = ["data", "metrics", "models", "relevance", "attacks", "training", "bench", "cli"]
SRC = Path(__file__).resolve().parents[1] / "src" / "advdet"
#: top-level modules of the package and the layer they belong to
TOP_LEVEL = {"__init__": "data", "__main__": "cli"}


def module_layer(path: Path, root: Path = SRC) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return parts[0] if len(parts) > 1 else TOP_LEVEL[parts[0]]


def imported_modules(path: Path, root: Path = SRC) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in ``path``; relative imports resolved."""
    package = list(path.relative_to(root.parent).parts[:-1])  # the package that holds the module
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            if name == "advdet":  # from advdet import cli
                out += [(node.lineno, f"advdet.{a.name}") for a in node.names]
    return out


def target_layer(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "advdet" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else TOP_LEVEL.get(parts[1])


def upward_imports(root: Path = SRC) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        here = module_layer(path, root)
        for line, name in imported_modules(path, root):
            there = target_layer(name)
            if there is not None and LAYERS.index(there) > LAYERS.index(here):
                bad.append(f"{path.relative_to(root.parent)}:{line}: {here} imports {name} ({there})")
    return bad


def test_every_module_has_a_layer():
    paths = list(SRC.rglob("*.py"))
    assert len(paths) > 50  # the check walks the real package
    for path in paths:
        assert module_layer(path) in LAYERS, path


def test_no_upward_import():
    assert upward_imports() == []


def test_the_check_finds_an_upward_import(tmp_path):
    """The rule itself can fail: a data module that imports bench, absolutely or relatively, is caught."""
    root = tmp_path / "advdet"
    (root / "data").mkdir(parents=True)
    (root / "bench").mkdir()
    (root / "data" / "bad.py").write_text("def f():\n    from advdet.bench import craft\n")
    (root / "data" / "worse.py").write_text("from ..bench.craft import x\nfrom advdet import cli\n"
                                            "from .. import bench\n")
    (root / "bench" / "ok.py").write_text("from advdet.data import coco\nfrom ..models import zoo\n")
    assert upward_imports(root) == ["advdet/data/bad.py:2: data imports advdet.bench (bench)",
                   "advdet/data/worse.py:1: data imports advdet.bench.craft (bench)",
                   "advdet/data/worse.py:2: data imports advdet.cli (cli)",
                   "advdet/data/worse.py:3: data imports advdet.bench (bench)"]


@pytest.mark.parametrize("name, layer", [("advdet.bench.craft", "bench"), ("advdet", None), ("torch.nn", None),
                                         ("advdet.__main__", "cli")])
def test_target_layer(name, layer):
    assert target_layer(name) == layer


#: the most lines a source file under src/advdet may have (issue 23: split a longer one by concept)
MAX_LINES = 400


def oversized_files(root: Path = SRC, limit: int = MAX_LINES) -> list[str]:
    """``path: N lines`` of every .py file under ``root`` longer than ``limit`` lines."""
    out = []
    for path in sorted(root.rglob("*.py")):
        n = len(path.read_text().splitlines())
        if n > limit:
            out.append(f"{path.relative_to(root.parent)}: {n} lines")
    return out


def test_no_source_file_over_400_lines():
    assert oversized_files() == []


def test_the_size_check_finds_a_long_file(tmp_path):
    root = tmp_path / "advdet"
    (root / "models").mkdir(parents=True)
    (root / "models" / "ok.py").write_text("x = 1\n" * MAX_LINES)
    (root / "models" / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert oversized_files(root) == [f"advdet/models/long.py: {MAX_LINES + 1} lines"]
