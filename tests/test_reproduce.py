"""`advdet reproduce`: the verdict rules against known answers (intervals above / below / across a threshold,
ratios per resample, claims over parts), and the resumable steps on tiny random models and 2 images."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from advdet.bench.reproduce import StaleStepError, reproduce, reproduce_command
from advdet.bench.reproduce_claims import (FAILS, HOLDS, UNDECIDED, combine, held_out_goal, mean_samples, rad_claims,
                                           rad_goal, ratio_samples, reduction_interval, robustdet_claims, verdict)
from advdet.bench.reproduce_pages import merge_model_steps
from advdet.bench.reproduce_steps import Step, rad_steps, robustdet_steps, step_cost, step_groups


# ------------------------------------------------------------------------------------------- verdict rules
def ci(lo, hi, value=None):
    return {"value": (lo + hi) / 2 if value is None else value, "lo": lo, "hi": hi}


def test_verdict_interval_above_below_or_across_the_threshold():
    assert verdict(ci(0.85, 0.95), 0.8) == HOLDS          # entirely above
    assert verdict(ci(0.60, 0.79), 0.8) == FAILS          # entirely below
    assert verdict(ci(0.70, 0.90), 0.8) == UNDECIDED      # crosses
    assert verdict(ci(0.80, 0.90), 0.8) == HOLDS          # ">= t": touching from above holds
    assert verdict(ci(0.70, 0.80), 0.8) == UNDECIDED      # reaches t: not entirely below
    # strict "> t": touching t is not above it
    assert verdict(ci(0.0, 0.2), 0.0, strict=True) == UNDECIDED
    assert verdict(ci(0.0, 0.0), 0.0, strict=True) == FAILS
    assert verdict(ci(0.01, 0.2), 0.0, strict=True) == HOLDS
    assert verdict(ci(-0.05, -0.04), -0.03) == FAILS and verdict(ci(-0.02, 0.01), -0.03) == HOLDS
    # undefined intervals decide nothing
    assert verdict(None, 0.5) == UNDECIDED
    assert verdict({"value": None, "lo": None, "hi": None}, 0.5) == UNDECIDED
    assert verdict({"value": 0.1, "lo": float("nan"), "hi": 0.3}, 0.5) == UNDECIDED


def test_combine_every_part():
    assert combine([HOLDS, HOLDS]) == HOLDS
    assert combine([HOLDS, UNDECIDED]) == UNDECIDED
    assert combine([UNDECIDED, FAILS, HOLDS]) == FAILS
    assert combine([]) == UNDECIDED


def test_reduction_is_computed_per_resample_not_from_the_interval_bounds():
    # attacked = half of clean on every resample: the reduction is exactly 50 % on every resample, although
    # the two sides vary a lot (a ratio of interval bounds would give anything from 0 % to 87.5 %)
    clean = np.array([0.2, 0.8, 0.4, 0.6])
    attacked = clean / 2
    r = reduction_interval(0.25, 0.5, attacked, clean)
    assert r == {"value": pytest.approx(0.5), "lo": pytest.approx(0.5), "hi": pytest.approx(0.5)}
    assert verdict(r, 0.5) == HOLDS and verdict(r, 0.5, strict=True) == FAILS
    # known percentiles: reductions 0.0, 0.1, ..., 0.9 -> numpy's linear 2.5 / 97.5 % quantiles
    red = np.arange(10) / 10
    r = reduction_interval(0.5, 1.0, 1.0 - red, np.ones(10))
    lo, hi = np.quantile(red, [0.025, 0.975])
    assert r["value"] == pytest.approx(0.5) and r["lo"] == pytest.approx(lo) and r["hi"] == pytest.approx(hi)
    assert r["lo"] == pytest.approx(0.0225) and r["hi"] == pytest.approx(0.8775)


def test_ratio_leaves_out_resamples_without_a_positive_reference():
    np.testing.assert_array_equal(ratio_samples([1.0, 2.0, 3.0], [2.0, 0.0, np.nan])[[0]], [0.5])
    assert np.isnan(ratio_samples([1.0, 2.0, 3.0], [2.0, 0.0, np.nan])[1:]).all()
    r = reduction_interval(0.1, 0.0, [0.1, 0.1], [0.0, 0.0])
    assert r == {"value": None, "lo": None, "hi": None} and verdict(r, 0.8) == UNDECIDED
    np.testing.assert_allclose(mean_samples([[0.2, np.nan], [0.4, 0.6]]), [0.3, 0.6])


def _toy_transfer(cells: dict[str, dict[str, list]]):
    """A Table 3 result with rows No Attack, Ablation, rad and dag (surrogate s), cls-pgd; victims s, v1, v2.
    ``cells[row][victim]`` are the resampled mAP50 values; the point value is their mean."""
    kinds = {"No Attack": ("reference", None, None), "Ablation": ("reference", "gaussian", None),
             "rad": ("detector", "rad", "s"), "dag-eps": ("detector", "dag-eps", "s"),
             "cls-pgd": ("classifier", "cls-pgd", "classifier")}
    rows, samples = [], {}
    for i, (label, per_v) in enumerate(cells.items()):
        kind, attack, sur = kinds[label]
        bb = ["v1", "v2"]
        rows.append({"label": label, "attack": attack, "kind": kind, "surrogate": sur, "sweep": None,
                     "sweep_value": None, "black_box": {"victims": bb},
                     "white_box": {"victim": "s"} if kind == "detector" else None,
                     "metrics": {v: {"map50": float(np.mean(s))} for v, s in per_v.items()}})
        for v, s in per_v.items():
            samples[(i, v)] = np.asarray(s, dtype=float)
    return {"rows": rows, "victims": ["s", "v1", "v2"]}, {"cells": samples}


def test_rad_claims_known_answers():
    const = lambda x: [x] * 4  # noqa: E731  (degenerate interval at the value)
    res, samples = _toy_transfer({
        "No Attack": {"s": const(0.8), "v1": const(0.6), "v2": const(0.4)},
        "Ablation": {"s": const(0.7), "v1": const(0.5), "v2": const(0.3)},
        "rad": {"s": [0.0, 0.1, 0.2, 0.3], "v1": const(0.3), "v2": const(0.2)},   # white-box cut 62.5-100 %
        "dag-eps": {"s": const(0.1), "v1": const(0.4), "v2": const(0.3)},         # bb 0.35: RAD 28.6 % lower
        "cls-pgd": {"s": const(0.7), "v1": const(0.33), "v2": const(0.27)},       # bb 0.30: RAD 16.7 % lower
    })
    claims = {c["id"]: c for c in rad_claims(res, samples)}
    wb = claims["white_box_cut"]
    assert wb["interval"]["value"] == pytest.approx(1 - 0.15 / 0.8)
    assert wb["verdict"] == UNDECIDED                       # [62.8 %, 100 %] crosses 80 %
    beats = claims["beats_baselines"]
    parts = {p["label"]: p for p in beats["parts"]}
    assert set(parts) == {"dag-eps", "cls-pgd"}               # No Attack and the Ablation are no baselines
    assert parts["dag-eps"]["interval"]["value"] == pytest.approx(1 - 0.25 / 0.35)
    assert parts["dag-eps"]["verdict"] == HOLDS and parts["cls-pgd"]["verdict"] == FAILS
    assert beats["verdict"] == FAILS
    halved = claims["black_box_halved"]                       # 0.25 vs 0.5: exactly halved
    assert halved["interval"]["lo"] == pytest.approx(0.5) and halved["verdict"] == HOLDS
    goal = {g["attack"]: g for g in rad_goal(res, samples)}
    assert list(goal) == ["Ablation", "rad", "dag-eps", "cls-pgd"]
    g = goal["rad"]                                           # v1: 50 % (holds), v2: 50 % (holds)
    assert [p["verdict"] for p in g["parts"]] == [HOLDS, HOLDS] and g["verdict"] == HOLDS
    d = goal["dag-eps"]                                       # v1 33 %, v2 25 %: fails, worst v2
    assert d["verdict"] == FAILS and d["worst"] == "v2"


def test_held_out_goal_known_answers():
    # No Attack, then two leave-one-out rows of pgd: a (ensemble b+c) and b (ensemble a+c); victims a, b, c
    rows = [{"label": "No Attack", "attack": None, "metrics": {"a": {"map50": 0.8}, "b": {"map50": 0.6}}},
            {"label": "ens-pgd without a", "attack": "pgd", "surrogate": "b+c", "held_out": "a",
             "metrics": {"a": {"map50": 0.3}, "b": {"map50": 0.1}}},
            {"label": "ens-pgd without b", "attack": "pgd", "surrogate": "a+c", "held_out": "b",
             "metrics": {"a": {"map50": 0.1}, "b": {"map50": 0.45}}}]
    cells = {(0, "a"): [0.8, 0.8, 0.8], (0, "b"): [0.6, 0.6, 0.6],
             (1, "a"): [0.2, 0.3, 0.4], (1, "b"): [0.1] * 3,    # a: cut 50-75 % -> holds
             (2, "a"): [0.1] * 3, (2, "b"): [0.4, 0.45, 0.5]}   # b: cut 16.7-33.3 % -> fails
    (g,) = held_out_goal({"rows": rows}, {"cells": cells})
    parts = {p["label"]: p for p in g["parts"]}
    assert g["attack"] == "pgd" and list(parts) == ["a", "b"]
    assert parts["a"]["interval"]["value"] == pytest.approx(1 - 0.3 / 0.8)
    assert parts["a"]["interval"]["lo"] >= 0.5 and parts["a"]["verdict"] == HOLDS
    assert parts["a"]["ensemble"] == "b+c" and parts["a"]["clean_map50"] == pytest.approx(0.8)
    assert parts["b"]["interval"]["value"] == pytest.approx(0.25) and parts["b"]["verdict"] == FAILS
    assert g["worst"] == "b" and g["verdict"] == FAILS


def test_robustdet_claims_known_answers():
    models = ["ssd_vgg", "ssd_vgg-mtd", "ssd_vgg-cwat", "robustdet"]
    m50 = {"ssd_vgg": {"clean": 0.90, "cls": 0.10}, "ssd_vgg-mtd": {"clean": 0.80, "cls": 0.40},
           "ssd_vgg-cwat": {"clean": 0.80, "cls": 0.45}, "robustdet": {"clean": 0.88, "cls": 0.50}}
    cells = {m: {k: np.full(5, v) for k, v in d.items()} for m, d in m50.items()}
    cells["ssd_vgg-cwat"]["cls"] = np.array([0.40, 0.45, 0.50, 0.55, 0.45])  # crosses robustdet's 0.50
    res = {"models": models, "attacks": ["clean", "cls"], "map50": m50}
    claims = {c["id"]: c for c in robustdet_claims(res, {"cells": cells})}
    clean = claims["clean_within_3 (robustdet)"]
    assert clean["interval"]["value"] == pytest.approx(-0.02) and clean["verdict"] == HOLDS
    above = claims["above_mtd_cwat (robustdet)"]
    parts = {p["label"]: p["verdict"] for p in above["parts"]}
    assert parts == {"cls: robustdet - ssd_vgg-mtd": HOLDS, "cls: robustdet - ssd_vgg-cwat": UNDECIDED}
    assert above["verdict"] == UNDECIDED
    m50["robustdet"]["clean"] = 0.85                           # 5 points below: fails
    cells["robustdet"]["clean"] = np.full(5, 0.85)
    claims = {c["id"]: c for c in robustdet_claims(res, {"cells": cells})}
    assert claims["clean_within_3 (robustdet)"]["verdict"] == FAILS
    assert "clean_within_3 (robustdet-cfr)" not in claims      # entries not in the table are left out


# ------------------------------------------------------------------------------------------- resumable runs
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from advdet.data.shapes import write_shapes_split

    root = tmp_path_factory.mktemp("tiny_shapes")
    write_shapes_split(root, "val", 2, seed=0, workers=1)
    return str(root)


@pytest.fixture(scope="module")
def tiny_models():
    from advdet.data.shapes import SHAPE_CLASSES
    from advdet.models.classifier import small_classifier
    from advdet.models.ssd_vgg import ssd_vgg_small
    from advdet.models.yolov3 import yolov3_small

    k = len(SHAPE_CLASSES)
    torch.manual_seed(0)
    return {"yolo": yolov3_small(num_classes=k, input_size=64).eval(),
            "ssd": ssd_vgg_small(num_classes=k, input_size=64, width=0.125).eval(),
            "classifier": small_classifier(num_classes=k, input_size=64).eval(),
            "ssd-mtd": ssd_vgg_small(num_classes=k, input_size=64, width=0.125).eval(),
            "robustdet": ssd_vgg_small(num_classes=k, input_size=64, width=0.125).eval()}


FAST = {"rad": {"steps": 1}, "dfool": {"steps": 1}, "cls-pgd": {"steps": 1}}
BASE = {"surrogates": ["yolo"], "victims": ["yolo", "ssd"], "classifier": "classifier"}
RAD_PLAN = [
    Step("table3", "Tables 3-5", "transfer", {**BASE, "attacks": ["rad", "dfool", "cls-pgd"], "eps": 16.0}),
    Step("table1_node_type_loc", "Table 1", "transfer",
         {**BASE, "attacks": ["rad"], "eps": 16.0, "sweep": "node_type", "sweep_values": ["loc"]},
         group="table1_node_type"),
    *[Step(f"fig7_eps_{e:g}", "Fig. 7", "transfer",
           {**BASE, "attacks": ["rad"], "eps": e, "sweep": "eps", "sweep_values": [e]}, group="fig7_eps")
      for e in (4.0, 8.0)],
]
STEP_NAMES = ["table3", "table1_node_type_loc", "fig7_eps_4", "fig7_eps_8"]


def test_rad_reproduction_resumes_and_states_command_weights_time_and_verdicts(tmp_path, tiny_data, tiny_models):
    out = tmp_path / "results"
    seen: list[tuple[str, str]] = []
    kw = dict(limit=2, data=tiny_data, models=tiny_models, plan=RAD_PLAN, attack_kwargs=FAST, n_boot=50,
              batch_size=2, progress=False, device="cpu", on_step=lambda n, s, t: seen.append((n, s)))
    page = reproduce("rad", out, steps=["table3"], **kw)
    assert seen == [("table3", "computed")]
    f3 = out / "rad" / "table3.json"
    rec = json.loads(f3.read_text())
    assert rec["config"]["limit"] == 2 and rec["result"]["images"] == 2 and rec["seconds"] > 0
    assert [r["label"] for r in rec["result"]["rows"]] == ["No Attack", "Ablation", "rad", "dfool", "cls-pgd"]
    ids = [c["id"] for c in page["claims"]]
    assert ids == ["white_box_cut", "beats_baselines", "black_box_halved"]
    assert all(c["verdict"] in (HOLDS, FAILS, UNDECIDED) for c in page["claims"])
    assert {p["label"] for p in page["claims"][1]["parts"]} == {"dfool", "cls-pgd"}
    assert [g["attack"] for g in page["goal"]] == ["Ablation", "rad", "dfool", "cls-pgd"]
    assert page["command"] == reproduce_command("rad", limit=2, out=out, steps=["table3"])
    assert page["steps"]["table1_node_type_loc"]["status"] == "not run"

    # a group name picks its steps (the two eps of Fig. 7; the page gathers both into one table)
    seen.clear()
    reproduce("rad", out, steps=["fig7_eps"], **kw)
    assert seen == [("fig7_eps_4", "computed"), ("fig7_eps_8", "computed")]
    md = (out / "rad.md").read_text()
    fig7 = md[md.index("## Fig. 7: RAD against eps"):]
    assert "rad eps=4" in fig7 and "rad eps=8" in fig7 and "rad eps=16 (Table 3's row)" in fig7

    # resume: table3 is reused (file untouched), the other steps are computed
    os.utime(f3, (1_000_000_000, 1_000_000_000))
    before = f3.read_bytes()
    seen.clear()
    page = reproduce("rad", out, **kw)
    assert seen == [("table3", "reused"), ("fig7_eps_4", "reused"), ("fig7_eps_8", "reused"),
                    ("table1_node_type_loc", "computed")]
    assert f3.stat().st_mtime == 1_000_000_000 and f3.read_bytes() == before
    # a third call recomputes nothing
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "rad").glob("*.json")}
    seen.clear()
    reproduce("rad", out, **kw)
    assert [s for _, s in seen] == ["reused"] * 4
    assert {p.name: p.stat().st_mtime_ns for p in (out / "rad").glob("*.json")} == mtimes

    md = (out / "rad.md").read_text()
    assert "advdet reproduce rad --limit 2" in md
    assert "## Verdicts: the paper's claims" in md and "## Project goal" in md
    for name in ("## Table 3: box mAP50", "## Table 5: perturbation", "## Table 1: node types",
                 "## Fig. 7: RAD against eps", "## Weights", "wall time"):
        assert name in md, name
    assert "rad [cls] (Table 3's row)" in md and "rad [loc]" in md
    assert (out / "rad" / "fig7_eps.png").is_file() and "(rad/fig7_eps.png)" in md
    js = json.loads((out / "rad.json").read_text())
    assert set(js["weights"]) == {"yolo", "ssd", "classifier"}
    assert js["weights"]["yolo"]["origin"] == "given" and js["wall_seconds"] > 0
    assert set(js["step_seconds"]) == set(STEP_NAMES)

    # another setting never overwrites a finished step
    with pytest.raises(StaleStepError, match="table3.json: made with other settings .*seed"):
        reproduce("rad", out, seed=1, **kw)
    assert f3.read_bytes() == before


def test_leave_one_out_step_gives_the_held_out_goal(tmp_path, tiny_data, tiny_models):
    plan = [Step("ensembles", "Leave-one-out", "transfer",
                 {"surrogates": [], "victims": ["yolo", "ssd"], "classifier": "classifier", "attacks": ["ens-pgd"],
                  "eps": 16.0, "leave_one_out": True})]
    page = reproduce("rad", tmp_path, limit=2, data=tiny_data, models=tiny_models, plan=plan,
                     attack_kwargs={"ens-pgd": {"steps": 1}}, n_boot=50, batch_size=2, progress=False, device="cpu")
    rec = json.loads((tmp_path / "rad" / "ensembles.json").read_text())
    rows = rec["result"]["rows"]
    assert [r["label"] for r in rows] == ["No Attack", "Ablation", "ens-pgd without yolo", "ens-pgd without ssd"]
    # the wiring (the goal's numbers: test_held_out_goal_known_answers; tiny random models detect nothing)
    (g,) = page["held_out_goal"]
    assert g["attack"] == "ens-pgd" and g["sweep_value"] is None
    assert [(p["label"], p["ensemble"]) for p in g["parts"]] == [("yolo", "ssd"), ("ssd", "yolo")]
    assert rec["derived"]["held_out_goal"] == page["held_out_goal"]
    md = (tmp_path / "rad.md").read_text()
    assert "## Leave-one-out ensembles: every victim against the ensemble of the others" in md
    assert "## Verdicts\n\nTable 3" in md  # no Table 3 in this plan: said, not failed


def _without_times(obj):
    """``obj`` without its wall / CPU timings (the only entries that differ between two runs)."""
    if isinstance(obj, dict):
        return {k: _without_times(v) for k, v in obj.items() if k not in ("seconds", "cpu_seconds")}
    if isinstance(obj, list):
        return [_without_times(v) for v in obj]
    return obj


def test_parallel_steps_write_the_same_files_as_one_process(tmp_path, tiny_data, tiny_models, caplog):
    kw = dict(limit=2, data=tiny_data, models=tiny_models, plan=RAD_PLAN, attack_kwargs=FAST, n_boot=50,
              batch_size=2, progress=False, device="cpu")
    seen: list[tuple[str, str]] = []
    reproduce("rad", tmp_path / "one", **kw)
    with caplog.at_level("INFO", logger="advdet.bench.reproduce"):
        reproduce("rad", tmp_path / "two", jobs=2, on_step=lambda n, s, t: seen.append((n, s)), **kw)
    assert "4 steps in 2 worker processes (1 torch threads each)" in caplog.text
    assert sorted(seen) == sorted((n, "computed") for n in STEP_NAMES)
    for name in STEP_NAMES:
        a, b = (json.loads((tmp_path / d / "rad" / f"{name}.json").read_text()) for d in ("one", "two"))
        assert a["config"] == b["config"] and a["derived"] == b["derived"], name
        assert _without_times(a["result"]) == _without_times(b["result"]), name
    rows = json.loads((tmp_path / "two" / "rad" / "table3.json").read_text())["result"]["rows"]
    assert min(r["perturbation"]["rmse"] for r in rows if r["label"] != "No Attack") > 0  # the images differ
    page = json.loads((tmp_path / "two" / "rad.json").read_text())
    assert {s["status"] for s in page["steps"].values()} == {"computed"}
    assert page["command"].endswith("--jobs 2")  # the page's wall time is that of two workers
    assert "--jobs" not in json.loads((tmp_path / "one" / "rad.json").read_text())["command"]
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        reproduce("rad", tmp_path / "three", jobs=0, **kw)


def test_step_cost_puts_rad_rows_first():
    # Table 3's default: RAD with SI (10) + 9 other attacks (0.5 each); one RAD row per sweep step: SI-like
    # 10, DI 13, none / TI 3 (one gradient per iteration); Table 1 of RobustDet: 7 x 5 cells
    costs = {s.name: step_cost(s) for s in rad_steps()}
    assert costs == {"table3": 14.5, "table1_node_type_loc": 10.0, "table1_node_type_size": 10.0,
                     "table2_technique_none": 3.0, "table2_technique_DI": 13.0, "table2_technique_TI": 3.0,
                     "fig7_eps_4": 10.0, "fig7_eps_8": 10.0, "fig7_eps_12": 10.0,
                     "ensembles": 21.0}  # six ensembles of five members, 0.7 each
    assert step_groups(rad_steps()) == {
        "table3": ["table3"], "table1_node_type": ["table1_node_type_loc", "table1_node_type_size"],
        "table2_technique": ["table2_technique_none", "table2_technique_DI", "table2_technique_TI"],
        "fig7_eps": ["fig7_eps_4", "fig7_eps_8", "fig7_eps_12"], "ensembles": ["ensembles"]}
    rob = robustdet_steps()
    assert [s.name for s in rob[:2]] == ["table1_ssd_vgg", "table1_ssd_vgg-at-cls"] and len(rob) == 14
    assert step_cost(rob[0]) == 5 * 40.0 and step_cost(rob[7]) == 2 * (1 + 5 + 10 + 20)


def test_robustdet_reproduction_claims_and_resume(tmp_path, tiny_data, tiny_models):
    # tiny random models under the zoo's names (given as modules: nothing is loaded)
    given = {"ssd_vgg": tiny_models["ssd"], "ssd_vgg-mtd": tiny_models["ssd-mtd"],
             "robustdet": tiny_models["robustdet"]}
    models = list(given)
    plan = [Step("table1", "Table 1", "robustness", {"models": models, "attacks": ["clean", "cls", "dag"], "steps": 1}),
            Step("fig7_steps", "Fig. 7a/b", "steps_sweep", {"models": models, "attacks": ["cls"], "steps": [1, 2]})]
    out = tmp_path / "results"
    kw = dict(limit=2, data=tiny_data, models=given, plan=plan, n_boot=50, batch_size=2, progress=False,
              device="cpu")
    page = reproduce("robustdet", out, **kw)
    assert page["steps"] == {"table1": {"file": "robustdet/table1.json", "status": "computed"},
                             "fig7_steps": {"file": "robustdet/fig7_steps.json", "status": "computed"}}
    claims = {c["id"]: c for c in page["claims"]}
    assert list(claims) == ["clean_within_3 (robustdet)", "above_mtd_cwat (robustdet)"]
    assert [p["label"] for p in claims["above_mtd_cwat (robustdet)"]["parts"]] == \
        ["cls: robustdet - ssd_vgg-mtd", "dag: robustdet - ssd_vgg-mtd"]
    rec = json.loads((out / "robustdet" / "table1.json").read_text())
    m50 = rec["result"]["map50"]
    c = claims["clean_within_3 (robustdet)"]
    assert c["interval"]["value"] == pytest.approx(m50["robustdet"]["clean"] - m50["ssd_vgg"]["clean"])
    assert c["verdict"] == verdict(c["interval"], -0.03)
    md = (out / "robustdet.md").read_text()
    assert "## Table 1: mAP50 (%) under white-box attacks" in md and "(robustdet/fig7_steps.png)" in md
    assert "## Verdicts: the paper's claims" in md and "clean_within_3 (robustdet)" in md
    assert (out / "robustdet" / "fig7_steps.png").is_file()
    again = reproduce("robustdet", out, **kw)
    assert {s["status"] for s in again["steps"].values()} == {"reused"}
    assert again["claims"] == page["claims"]


def test_robustdet_steps_per_model_merge_into_the_one_call_table(tmp_path, tiny_data, tiny_models):
    given = {"ssd_vgg": tiny_models["ssd"], "ssd_vgg-mtd": tiny_models["ssd-mtd"],
             "robustdet": tiny_models["robustdet"]}
    models = list(given)
    one = [Step("table1", "Table 1", "robustness", {"models": models, "attacks": ["clean", "cls", "dag"], "steps": 1}),
           Step("fig7_steps", "Fig. 7", "steps_sweep", {"models": models, "attacks": ["cls", "loc"], "steps": [1, 2]})]
    per = robustdet_steps(models, attacks=("clean", "cls", "dag"), sweep_steps=(1, 2), attack_steps=1)
    assert [s.name for s in per] == ["table1_ssd_vgg", "table1_ssd_vgg-mtd", "table1_robustdet",
                                     "fig7_steps_ssd_vgg", "fig7_steps_ssd_vgg-mtd", "fig7_steps_robustdet"]
    kw = dict(limit=2, data=tiny_data, models=given, n_boot=50, batch_size=2, progress=False, device="cpu")
    whole = reproduce("robustdet", tmp_path / "one", plan=one, **kw)
    # one model first: the page shows it, but gives no verdict on a partial table
    part = reproduce("robustdet", tmp_path / "per", plan=per, steps=["table1_robustdet"], **kw)
    assert part["claims"] == []
    assert "Table 1 is partial, so no verdict is given yet" in (tmp_path / "per" / "robustdet.md").read_text()
    split = reproduce("robustdet", tmp_path / "per", plan=per, **kw)
    # the benchmark's own intervals of the one call (unrounded resamples) against those merged from the steps
    for table in ("table1", "fig7_steps"):
        ref = json.loads((tmp_path / "one" / "robustdet" / f"{table}.json").read_text())["result"]
        res, _ = merge_model_steps([json.loads((tmp_path / "per" / "robustdet" / f"{table}_{m}.json").read_text())
                                    for m in models])
        assert res["models"] == models and res["map50"] == ref["map50"]
        for key in ("map50", "paired"):
            for m, cols in ref["intervals"][key].items():
                assert set(res["intervals"][key][m]) == set(cols)
                for col, ci in cols.items():
                    for k in ("value", "lo", "hi"):
                        got = res["intervals"][key][m][col][k]
                        assert got == pytest.approx(ci[k], abs=2e-6), (table, key, m, col, k)
    assert [c["id"] for c in split["claims"]] == [c["id"] for c in whole["claims"]]
    for a, b in zip(whole["claims"], split["claims"]):
        assert a["verdict"] == b["verdict"]
        assert b["interval"] is None or b["interval"]["value"] == pytest.approx(a["interval"]["value"], abs=2e-6)
    md = (tmp_path / "per" / "robustdet.md").read_text()
    assert "Table 1 is partial" not in md and "(robustdet/fig7_steps.png)" in md
    # (tiny random models score 0 everywhere, so this checks the plumbing against one call; the merge's
    # numbers: test_merge_model_steps_known_answers)


def _model_step(model: str, points: dict, samples: dict, **config) -> dict:
    """A step file of one model's robustness row: point mAP50 per column and the per-resample values."""
    return {"config": {"step": f"table1_{model}", "limit": 4, "seed": 0, "n_boot": 6, "boot_seed": 0,
                       "params": {"models": [model], "attacks": list(points)}, "weights_sha256": {model: model},
                       **config},
            "result": {"kind": "robustness_table", "images": 4, "models": [model], "attacks": list(points),
                       "map50": {model: dict(points)}, "weights": {model: "given"},
                       "intervals": {"method": "bootstrap", "metric": "map50", "images": 4, "n_boot": 6,
                                     "seed": 0, "level": 0.95}},
            "derived": {"samples": {model: {k: list(v) for k, v in samples.items()}}}}


def test_merge_model_steps_known_answers():
    rng = np.random.default_rng(0)
    s = {m: {c: rng.uniform(0.2, 0.9, 6) for c in ("clean", "cls")} for m in ("base", "b", "c")}
    pts = {"base": {"clean": 0.8, "cls": 0.3}, "b": {"clean": 0.7, "cls": 0.5}, "c": {"clean": 0.75, "cls": 0.45}}
    res, samples = merge_model_steps([_model_step(m, pts[m], s[m]) for m in ("base", "b", "c")])
    assert res["models"] == ["base", "b", "c"] and res["map50"] == pts
    iv = res["intervals"]
    for m in ("base", "b", "c"):
        for c in ("clean", "cls"):
            lo, hi = np.quantile(s[m][c], [0.025, 0.975])           # numpy's percentiles, directly
            assert iv["map50"][m][c] == pytest.approx({"value": pts[m][c], "lo": lo, "hi": hi})
    for m in ("b", "c"):                                              # paired with the first model, per resample
        for c in ("clean", "cls"):
            lo, hi = np.quantile(s[m][c] - s["base"][c], [0.025, 0.975])
            assert iv["paired"][m][c] == pytest.approx({"value": pts[m][c] - pts["base"][c], "lo": lo, "hi": hi})
    assert "base" not in iv["paired"]
    # steps made with other settings are never merged into one table
    with pytest.raises(ValueError, match="different settings: table1_base, table1_b"):
        merge_model_steps([_model_step("base", pts["base"], s["base"]),
                           _model_step("b", pts["b"], s["b"], seed=1)])


def test_weights_fingerprint_is_the_zoo_file_sha256(tmp_path, monkeypatch):
    from advdet.bench import reproduce as rp
    from advdet.models.weights import sha256_file
    from advdet.models.zoo import zoo_entry

    entry = zoo_entry("ssd_vgg")
    fp = rp._weights_fingerprint("ssd_vgg", None)
    if not os.path.isfile(entry.weights_path):
        assert fp == {"file": None, "sha256": None, "origin": "untrained"}
    else:
        assert fp["sha256"] == sha256_file(entry.weights_path) and fp["origin"] == "zoo"
    assert rp._weights_fingerprint("ssd_vgg", {"ssd_vgg": object()})["origin"] == "given"
    # the page names a shipped file by its place in the package, not by the folder of the checkout
    from advdet.bench.reproduce_pages import _shown_file

    zoo = {"file": "/tmp/clone/src/advdet/zoo_weights/yolov3.safetensors", "sha256": "ab", "origin": "zoo"}
    assert _shown_file(zoo) == "advdet/zoo_weights/yolov3.safetensors"
    assert _shown_file({"file": "/data/mine.pt", "sha256": "cd", "origin": "file"}) == "/data/mine.pt"
    assert _shown_file({"file": None, "sha256": None, "origin": "given"}) == "given"


def test_unknown_target_and_step_are_user_errors(tmp_path):
    from advdet.data.errors import AdvdetError

    with pytest.raises(AdvdetError, match="unknown reproduction 'yolo'"):
        reproduce("yolo", tmp_path)
    with pytest.raises(AdvdetError, match="unknown step nope of rad; its steps are table3, table1_node_type_loc"):
        reproduce("rad", tmp_path, steps=["nope"])


def test_cli_is_registered():
    from typer.testing import CliRunner

    from advdet.cli import app

    res = CliRunner().invoke(app, ["reproduce", "--help"])
    assert res.exit_code == 0 and "--limit" in res.output and "robustdet" in res.output
    res = CliRunner().invoke(app, ["reproduce", "yolo"])
    assert res.exit_code == 2
