"""docs/zoo.md is generated from the zoo cards by `advdet zoo docs` (issue 23, item 8)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from typer.testing import CliRunner

from advdet.cli import app
from advdet.models.zoo import ZOO_DIR
from advdet.models.zoo_docs import ZOO_DOCS_COMMAND, read_zoo_cards, render_zoo_markdown, zoo_markdown

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "zoo.md"


def _rows(page: str, header_start: str) -> dict[str, list[str]]:
    """The rows of the markdown table whose header starts with ``header_start``, keyed by the first cell."""
    lines = page.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        rows[cells[0].strip("`")] = cells
    return rows


def test_committed_page_is_what_the_command_writes_now():
    assert PAGE.read_text() == zoo_markdown(), \
        f"docs/zoo.md is stale: rerun `uv run --frozen {ZOO_DOCS_COMMAND}`"


def test_every_card_is_on_the_page_with_its_numbers():
    page = PAGE.read_text()
    cards = {p.stem: json.loads(p.read_text()) for p in ZOO_DIR.glob("*.json")}
    assert len(cards) >= 8
    rows = _rows(page, "| name | family |")
    assert set(rows) == set(cards)
    for name, card in cards.items():
        cells = rows[name]
        assert cells[1] == card["family"] and cells[2] == card["kind"]
        if "shapes_val" in card:
            assert cells[5].split()[0] == f"{card['shapes_val']['map50']:.3f}"
            assert cells[6].split()[0] == f"{card['shapes_val']['map']:.3f}"
            assert cells[11] == f"`advdet eval --model {name} --data shapes-val`"
        else:
            assert cells[5] == f"top-1 {card['procedural_val']['top1']:.3f}"


def test_sha256_columns_match_the_weight_files():
    page = PAGE.read_text()
    short = _rows(page, "| name | family |")
    full = _rows(page, "| name | sha256 of the weights |")
    for p in ZOO_DIR.glob("*.safetensors"):
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        assert full[p.stem][1] == f"`{digest}`", p.name
        assert short[p.stem][10] == f"`{digest[:12]}`", p.name


def test_retinanet_is_documented_with_its_card_numbers():
    card = json.loads((ZOO_DIR / "retinanet.json").read_text())
    row = _rows(PAGE.read_text(), "| name | family |")["retinanet"]
    assert row[5] == f"{card['shapes_val']['map50']:.3f}"
    assert row[8] == (f"backbone of {card['backbone_init']}" if card.get("backbone_init") else "scratch")


def test_render_is_pure_and_flags_what_disagrees():
    cards = [
        {"name": "m", "family": "maskrcnn", "kind": "detector", "description": "a | b", "sha256": "a" * 64,
         "shapes_val": {"map": 0.5, "map50": 0.8, "segm_map": 0.4, "segm_map50": 0.7},
         "recipe": {"epochs": 6, "batch_size": 8, "optimizer": "adamw", "lr": 1e-3, "lr_schedule": "cosine"},
         "training_seconds": 12.4, "machine": "x, trained on NVIDIA H200", "file_size": 2_000_000},
        {"name": "c", "family": "classifier", "kind": "classifier", "recipe": None, "backbone_init": "pre",
         "procedural_val": {"top1": 0.25, "top5": 0.5}, "sha256": "b" * 64},
    ]
    page = render_zoo_markdown(cards, {"m": "c" * 64}, not_trained=["x_pre"])
    assert page == render_zoo_markdown(cards, {"m": "c" * 64}, not_trained=["x_pre"])
    rows = _rows(page, "| name | family |")
    assert rows["m"][3] == "a \\| b"  # a pipe in a description does not break the table
    assert rows["m"][5] == "0.800 (mask 0.700)" and rows["m"][6] == "0.500 (mask 0.400)"
    assert rows["m"][7] == "6 epochs, batch 8, adamw lr 0.001, cosine"
    assert rows["m"][9] == "12 s (NVIDIA H200)" and rows["m"][10] == f"`{'c' * 12}`"
    assert rows["c"][5] == "top-1 0.250" and rows["c"][8] == "backbone of pre"
    assert rows["c"][10] == "missing"  # no weight file, no hash
    prov = _rows(page, "| name | sha256 of the weights |")
    assert "the card says " + "a" * 64 in prov["m"][1]  # the file is not the one the card describes
    assert prov["c"][1] == "file missing"
    assert "`x_pre`" in page and ZOO_DOCS_COMMAND in page.splitlines()[2]


def test_cards_are_ordered_from_the_cards_alone(tmp_path):
    cards = {"b": {"kind": "detector"}, "a": {"kind": "detector", "init": "b"}, "z": {"kind": "backbone"},
             "c": {"kind": "classifier"}, "d": {}}
    for n, c in cards.items():
        (tmp_path / f"{n}.json").write_text(json.dumps(c))  # "name" missing: the file's stem
    assert [c["name"] for c in read_zoo_cards(tmp_path)] == ["z", "c", "b", "d", "a"]


def test_cli_writes_the_page_and_check_detects_a_stale_one(tmp_path):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    card = json.loads((ZOO_DIR / "fcos.json").read_text())
    (zoo / "fcos.json").write_text(json.dumps(card))
    (zoo / "fcos.safetensors").write_bytes(b"not really weights")
    out = tmp_path / "docs" / "zoo.md"
    run = CliRunner().invoke(app, ["zoo", "docs", "--out", str(out), "--zoo-dir", str(zoo)])
    assert run.exit_code == 0, run.output
    page = out.read_text()
    assert page == zoo_markdown(zoo)
    assert hashlib.sha256(b"not really weights").hexdigest() in page
    assert CliRunner().invoke(app, ["zoo", "docs", "--out", str(out), "--zoo-dir", str(zoo), "--check"]).exit_code == 0
    card["shapes_val"]["map50"] = 0.1
    (zoo / "fcos.json").write_text(json.dumps(card))
    stale = CliRunner().invoke(app, ["zoo", "docs", "--out", str(out), "--zoo-dir", str(zoo), "--check"])
    assert stale.exit_code == 1 and "stale" in stale.output
    assert out.read_text() == page  # --check writes nothing
