"""README.md is a user's guide (issue 23, item 8): short, the two commands first, and every command,
option, import and link it shows is real."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
import typer

from advdet.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _advdet_lines(text: str) -> list[str]:
    """Every `advdet ...` invocation in the README's bash blocks, continuation lines joined."""
    out = []
    for block in _blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if re.search(r"(^|\s)advdet(\s|$)", line):
                out.append(line)
    return out


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines (at most 200)"
    assert lines[0] == "# advdet"
    commands = [ln for ln in lines[:12] if ln.startswith("make ")]
    assert [c.split()[1] for c in commands] == ["demo", "test"]
    assert lines.index(commands[0]) < 5  # the first thing in the README
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


def _is_group(cmd) -> bool:
    return hasattr(cmd, "get_command")  # typer vendors click: duck-type its Group


def _options(cmd) -> set[str]:
    opts = {"--help"}
    for p in cmd.params:
        opts.update(o for o in p.opts + p.secondary_opts if o.startswith("-"))
    return opts


def _check(line: str) -> list[str]:
    """Problems with one README command line: unknown (sub)commands or options."""
    tokens = line.split()
    tokens = tokens[tokens.index("advdet") + 1:]
    cmds = [typer.main.get_command(app)]
    problems = []
    i = 0
    while i < len(tokens):
        tok = tokens[i].strip("[]")
        if tok.startswith("-"):
            name = tok.split("=")[0]
            for c in cmds:
                if name not in _options(c):
                    problems.append(f"{line!r}: {c.name} has no option {name}")
        elif all(_is_group(c) for c in cmds):
            subs = []
            for alt in tok.split("|"):
                sub = cmds[0].get_command(cmds[0].context_class(cmds[0]), alt)
                if sub is None:
                    problems.append(f"{line!r}: no command {alt!r} under {cmds[0].name}")
                else:
                    subs.append(sub)
            cmds = subs or cmds
        i += 1
    if any(_is_group(c) for c in cmds) and "--help" not in tokens:
        problems.append(f"{line!r}: names a command group, not a command")
    return problems


def test_every_command_and_option_in_the_readme_exists():
    lines = _advdet_lines(README.read_text())
    assert len(lines) >= 15
    assert any(ln.startswith("advdet zoo docs") for ln in lines)
    problems = [p for ln in lines for p in _check(ln)]
    assert not problems, "\n".join(problems)


def test_the_checker_catches_a_wrong_command():
    assert _check("advdet zoo list --json") == []
    assert _check("advdet zoo lst") and _check("advdet eval --modle yolov3") and _check("advdet zoo")


def test_python_in_the_readme_imports_what_exists():
    for block in _blocks(README.read_text(), "python"):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"


def test_every_relative_link_exists():
    text = README.read_text()
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [ln for ln in links if not re.match(r"[a-z]+://", ln)]
    assert len(local) >= 10
    missing = [ln for ln in local if not (ROOT / ln).exists()]
    assert not missing, f"README links to missing files: {missing}"


@pytest.mark.parametrize("page", sorted((ROOT / "docs" / "results").glob("*.md")), ids=lambda p: p.name)
def test_result_pages_name_their_command_and_weights(page):
    text = page.read_text()
    if page.name == "README.md":
        return
    assert "**Command" in text, f"{page.name} does not name the command that made its numbers"
    assert "**Weights" in text, f"{page.name} does not say which weights made its numbers"
    assert re.search(r"\b[0-9a-f]{64}\b", text), f"{page.name} gives no full sha256"
