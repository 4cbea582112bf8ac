"""The one attack grammar (issue 23, item 5): ``NAME:KEY=VALUE,...`` parsed and type-checked in
``advdet.attacks.spec``, accepted by every command that takes an attack; class attributes instead of
side lists; one name, one attack."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from typer.testing import CliRunner

from advdet.attacks import ATTACKS, DI, MI, SI, TI, AttackSpec, build_attack, parse_attack_list, parse_settings
from advdet.attacks.dag import DAG
from advdet.attacks.dag_robustdet import RobustDetDAG
from advdet.attacks.registry import attacks_of_kind
from advdet.attacks.spec import accepts, transforms_for
from advdet.data.errors import OptionError, UnknownNameError


# ------------------------------------------------------------------------------------------ parsing
def test_spec_parses_typed_values_and_transforms():
    s = AttackSpec.parse("rad:steps=5,technique=SI+MI")
    assert s.name == "rad" and s.kwargs == {"steps": 5, "transforms": "SI+MI"}
    assert type(s.kwargs["steps"]) is int and str(s) == "rad:steps=5,transforms=SI+MI"
    s = AttackSpec.parse("rad:eps=8,step=1.5,valid_only=false,pad_value=none,variant=paper,micro_batch=2,"
                         "nodes=dynamic,threshold=-2")
    assert s.kwargs == {"eps": 8.0, "step": 1.5, "valid_only": False, "pad_value": None, "variant": "paper",
                        "micro_batch": 2, "nodes": "dynamic", "threshold": -2.0}
    assert type(s.kwargs["eps"]) is float and type(s.kwargs["micro_batch"]) is int
    assert AttackSpec.parse("rad:micro_batch=auto").kwargs == {"micro_batch": "auto"}  # int | None | str
    assert AttackSpec.parse("dag:eps=none,early_stop=yes").kwargs == {"eps": None, "early_stop": True}
    assert AttackSpec.parse(" dfool ").kwargs == {}
    # DAGEps forwards **kw to DAG: DAG's keywords are checked too
    assert AttackSpec.parse("dag-eps:num_candidates=100").kwargs == {"num_candidates": 100}
    # the ensemble options, next to every detector attack's own; a list value in brackets keeps its commas
    assert AttackSpec.parse("pgd:weights=[2,1,1],normalize=true").kwargs == {"weights": [2, 1, 1], "normalize": True}


def test_transforms_with_settings_build_fresh_instances():
    ts = transforms_for("SI(scales=5,extra_unscaled=false)+MI(mu=0.5)")
    assert [type(t) for t in ts] == [SI, MI] and ts[0].scales == 5 and not ts[0].extra_unscaled and ts[1].mu == 0.5
    assert [type(t) for t in transforms_for("di+TI")] == [DI, TI] and transforms_for("none") == []
    s = AttackSpec.parse("cls-pgd:transforms=SI(scales=2)+MI,steps=1")
    assert s.kwargs == {"transforms": "SI(scales=2)+MI", "steps": 1}
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    a, b = s.build(model), s.build(model)
    assert [type(t) for t in a.transforms] == [SI, MI] and a.transforms[0].scales == 2 and a.steps == 1
    assert a.transforms[1] is not b.transforms[1]  # fresh momentum per attack
    # build_attack reads text values by the same rules (the Python API and every command agree)
    atk = build_attack("pgd", None, steps="3", technique="MI", valid_only="true")
    assert atk.steps == 3 and [type(t) for t in atk.transforms] == [MI] and atk.valid_only is True


@pytest.mark.parametrize("text,message", [
    ("rad:stepz=5", "attack 'rad': unknown option 'stepz'; valid: preset, eps, step, steps,"),
    ("rad:steps=abc", "attack 'rad': steps='abc' is not an int"),
    ("rad:variant=foo", "attack 'rad': variant='foo' is not paper or rad_code or none"),
    ("rad:steps", "attack 'rad': expected KEY=VALUE, got 'steps'"),
    ("dag:early_stop=maybe", "attack 'dag': early_stop='maybe' is not a bool"),
    ("rad:technique=XX", "attack 'rad': technique='XX': unknown update technique 'XX'"),
    ("rad:technique=SI(scalez=2)", "unknown option 'scalez'; valid: scales"),
    ("gaussian:technique=SI", "attack 'gaussian': unknown option 'technique'; valid: sigma, eps"),
    ("rad:rules=x", "attack 'rad': rules='x' is not LRPRules or none"),
    ("dag-eps:gamma=2", "attack 'dag-eps': unknown option 'gamma'; valid:"),  # its step is DAG's gamma
])
def test_spec_errors_name_the_attack_and_the_key(text, message):
    with pytest.raises(OptionError) as err:
        AttackSpec.parse(text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_attack_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="unknown attack 'nope'; known: pgd, cls"):
        AttackSpec.parse("nope:steps=1")


def test_lists_of_specs_and_the_set_sugar():
    specs = parse_attack_list("rad:steps=5,technique=SI,dfool;loc-shift:step=1,cls-pgd")
    assert [(s.name, s.kwargs) for s in specs] == [("rad", {"steps": 5, "transforms": "SI"}), ("dfool", {}),
                                                   ("loc-shift", {"step": 1.0}), ("cls-pgd", {})]
    # a bare name followed by key=value parts: those are its settings
    assert parse_attack_list("cls,steps=2")[0].kwargs == {"steps": 2}
    assert [s.name for s in parse_attack_list("clean,cls", extra_names=("clean",))] == ["clean", "cls"]
    assert [s.name for s in parse_attack_list("nope,dfool", allow_unknown=True)] == ["nope", "dfool"]
    with pytest.raises(OptionError, match="attack listed twice: rad"):
        parse_attack_list("rad,dfool,rad:steps=1")
    assert parse_settings(["rad.steps=5", "loc.step=2", "rad.weights=loss"]) == \
        {"rad": {"steps": 5, "weights": "loss"}, "loc": {"step": 2.0}}
    assert parse_settings(["steps=5", "technique=MI"], attack="cls") == {"cls": {"steps": 5, "transforms": "MI"}}
    with pytest.raises(OptionError, match="ATTACK.KEY=VALUE"):
        parse_settings(["steps=5"])
    with pytest.raises(OptionError, match="attack 'loc': unknown option 'sigma'"):
        parse_settings(["loc.sigma=2"])


# ------------------------------------------------------------------------------------------ class attributes
def test_class_attributes_replace_the_side_lists():
    assert set(attacks_of_kind("classifier")) == {"cls-pgd", "cls-si-pgd", "cls-mi-di-pgd", "cls-mi-ti-pgd"}
    assert attacks_of_kind("none") == ["gaussian"]
    assert {n for n, c in ATTACKS.items() if c.budget == "eps=step"} == {"pgd", "cls", "loc", "cwa", "mtd"}
    assert {n for n, c in ATTACKS.items() if c.budget == "none"} == {"dag-robustdet", "gaussian"}
    assert accepts(ATTACKS["rad"], "nodes") and accepts(ATTACKS["dfool"], "technique")
    assert not accepts(ATTACKS["dfool"], "nodes") and not accepts(ATTACKS["gaussian"], "transforms")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from advdet.attacks import CLASSIFIER_ATTACKS  # the old name still answers, with a warning
    assert CLASSIFIER_ATTACKS == set(attacks_of_kind("classifier"))
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)


def test_the_transfer_rows_read_the_class_attributes():
    from advdet.bench.transfer_rows import plan_rows

    rows = plan_rows(["s"], ["dag-robustdet", "dag", "cls-pgd", "rad"], eps=8.0, sweep="technique",
                     sweep_values=["none", "MI"], attack_kwargs={"rad": {"steps": "2"}})
    by = {(r.attack, r.sweep_value): r for r in rows if r.attack}
    assert "eps" not in by[("dag-robustdet", "none")].kwargs  # budget "none": no eps
    assert by[("dag", "none")].kwargs["eps"] == 8.0  # Xie's DAG takes an optional eps
    assert by[("cls-pgd", "MI")].surrogate == "classifier" and by[("cls-pgd", "MI")].kind == "classifier"
    assert by[("rad", "MI")].kwargs == {"steps": 2, "eps": 8.0, "technique": "MI"}  # text setting typed


# ------------------------------------------------------------------------------------------ one name, one attack
def test_one_name_one_attack(caplog):
    from advdet.bench.demo import DEMO_ATTACKS
    from advdet.bench.robustness_columns import TABLE_ATTACKS, attack_label, build_table_attack, column_names
    from advdet.cli.bench_transfer import DEFAULT_ATTACKS

    assert TABLE_ATTACKS[-1] == "dag-robustdet" and "dag" not in TABLE_ATTACKS
    assert attack_label("dag") == "DAG (Xie)" and attack_label("dag-robustdet") == "DAG (RobustDet)"
    assert attack_label("loc") == "A_loc" and attack_label("loc-shift") == "Loc shift"
    assert type(build_attack("dag", None)) is DAG and type(build_attack("dag-robustdet", None)) is RobustDetDAG
    with caplog.at_level(logging.WARNING):
        assert column_names(["clean", "dag-xie"]) == ["clean", "dag"]
        assert type(build_attack("dag-xie", None)) is DAG
    assert "'dag-xie' is deprecated" in caplog.text
    assert build_table_attack("dag", None, steps=2).steps == 2
    # RAD's "Loc" row is loc-shift; loc is A_loc everywhere (robustness column, training, transfer row)
    assert "loc-shift" in DEMO_ATTACKS and "loc" not in DEMO_ATTACKS
    assert "loc-shift" in DEFAULT_ATTACKS.split(",") and "loc" not in DEFAULT_ATTACKS.split(",")


# ------------------------------------------------------------------------------------------ every command
@pytest.fixture(scope="module")
def shapes2(tmp_path_factory):
    from advdet.data.shapes import generate_shapes

    root = tmp_path_factory.mktemp("spec_shapes")
    generate_shapes(root, train=0, val=2, seed=1, workers=1)
    return root / "val"


def _one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def test_cli_attack_takes_a_spec_with_transforms(shapes2, tmp_path):
    from advdet.cli import app

    runner = CliRunner()
    out = tmp_path / "a"
    res = runner.invoke(app, ["attack", "--attack", "dfool:steps=1,technique=MI(mu=0.5),eps=4", "--model", "ssd_vgg",
                              "--untrained", "--data", str(shapes2), "--out", str(out), "--limit", "1",
                              "--set", "step=1"], terminal_width=200)
    assert res.exit_code == 0, res.output
    hp = json.loads((out / "card.json").read_text())["attack"]["hyperparameters"]
    assert (hp["steps"], hp["eps"], hp["step"]) == (1, 4.0, 1.0) and hp["transforms"] == ["MI(mu=0.5)"]
    line = _one_line_error(runner.invoke(app, ["attack", "--attack", "dfool:stepz=1", "--model", "ssd_vgg",
                                               "--data", str(shapes2), "--out", str(tmp_path / "b")]))
    assert "attack 'dfool': unknown option 'stepz'; valid:" in line
    line = _one_line_error(runner.invoke(app, ["attack", "--attack", "dfool:steps=2", "--steps", "1", "--model",
                                               "ssd_vgg", "--data", str(shapes2), "--out", str(tmp_path / "c")]))
    assert "steps given twice" in line


def _capture(monkeypatch, module, name):
    seen = {}

    def fake(*args, **kw):
        seen.update(kw, args=args)
        raise SystemExit(0)

    monkeypatch.setattr(module, name, fake)
    return seen


def test_cli_dataset_transfer_robustness_demo_take_the_spec(monkeypatch, tmp_path):
    """Each command hands the spec's typed settings to the library (the library call itself is replaced:
    the crafting loops have their own end-to-end tests)."""
    import advdet.bench.aoco as aoco
    import advdet.bench.demo as demo
    import advdet.bench.robustness as robustness
    import advdet.bench.transfer as transfer
    from advdet.cli import app

    runner = CliRunner()
    seen = _capture(monkeypatch, aoco, "build_aoco")
    res = runner.invoke(app, ["dataset", "--data", "shapes-val", "--out", str(tmp_path / "d"),
                              "--attack", "rad:steps=1,technique=SI+MI", "--set", "m=5"])
    assert res.exit_code == 0, res.output
    assert seen["attack"] == "rad" and seen["eps"] == 16.0
    assert seen["attack_kwargs"] == {"steps": 1, "transforms": "SI+MI", "m": 5}

    seen = _capture(monkeypatch, transfer, "transfer_matrix")
    res = runner.invoke(app, ["bench", "transfer", "--victims", "yolov3", "--attacks",
                              "rad:steps=2,technique=SI,dfool,loc-shift:step=1", "--set", "dfool.steps=3"])
    assert res.exit_code == 0, res.output
    assert seen["args"][1] == ["rad", "dfool", "loc-shift"]
    assert seen["attack_kwargs"] == {"rad": {"steps": 2, "transforms": "SI"}, "dfool": {"steps": 3},
                                     "loc-shift": {"step": 1.0}}

    seen = _capture(monkeypatch, robustness, "robustness_table")
    res = runner.invoke(app, ["bench", "robustness", "--models", "ssd_vgg", "--attacks",
                              "clean,cls:steps=3,technique=MI,dag-robustdet", "--set", "cls.eps=4"])
    assert res.exit_code == 0, res.output
    assert seen["args"][1] == ["clean", "cls", "dag-robustdet"]
    assert seen["attack_kwargs"] == {"cls": {"steps": 3, "transforms": "MI", "eps": 4.0}}

    seen = _capture(monkeypatch, demo, "run_demo")
    monkeypatch.setattr("advdet.data.shapes.ensure_default_shapes", lambda *a, **k: tmp_path)
    res = runner.invoke(app, ["demo", "--attacks", "rad:steps=1,dfool", "--set", "dfool.steps=1", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert seen["attacks"] == ("rad", "dfool") and seen["attack_kwargs"] == {"rad": {"steps": 1}, "dfool": {"steps": 1}}

    for argv in (["bench", "transfer", "--victims", "yolov3", "--attacks", "rad:stepz=2"],
                 ["bench", "robustness", "--models", "ssd_vgg", "--attacks", "clean,cls:steps=x"],
                 ["dataset", "--data", "shapes-val", "--out", str(tmp_path / "e"), "--attack", "rad:m=x"],
                 ["demo", "--attacks", "dfool:technique=QQ"],
                 ["analyze", "confidence", "--model", "ssd_vgg", "--attacks", "cls:stepz=1", "--out", str(tmp_path)]):
        assert "error: attack '" in _one_line_error(runner.invoke(app, argv, terminal_width=200))
