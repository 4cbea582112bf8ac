"""benchmarks/transfer_regime.py on a 2-image folder with three shipped zoo detectors (a smoke run of the
command; the measurement itself is a benchmark, not a test)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("transfer_regime", ROOT / "benchmarks" / "transfer_regime.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_transfer_regime_rows_drops_and_goals(tmp_path):
    from advdet.data.shapes import generate_shapes

    generate_shapes(tmp_path / "shp", train=0, val=2, seed=0, workers=1)
    mod = _module()
    out = tmp_path / "regime.json"
    rc = mod.main(["--models", "yolov3,ssd_vgg,fcos", "--surrogates", "yolov3", "--attacks", "pgd", "--images", "2",
                   "--data", str(tmp_path / "shp" / "val"), "--pgd-steps", "2", "--batch-size", "2",
                   "--n-boot", "50", "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    labels = [r["label"] for r in doc["rows"]]
    assert labels[:3] == ["No Attack", "Ablation", "pgd"]
    assert labels[3:] == [f"ens-pgd (all but {m})" for m in ("yolov3", "ssd_vgg", "fcos")]
    assert set(doc["clean_map50"]) == {"yolov3", "ssd_vgg", "fcos"}
    for r in doc["rows"][1:]:
        for v, d in r["drop"].items():
            c, a = doc["clean_map50"][v], r["map50"][v]
            assert d is None or abs(d - (1 - a / c)) < 1e-9
    goals = doc["goals"]
    assert set(goals) == {"ablation_black_box_drop", "output_attacks_from_yolov3", "leave_one_out_held_out_drop"}
    assert set(goals["leave_one_out_held_out_drop"]) == {"yolov3", "ssd_vgg", "fcos"}
    assert doc["settings"]["pgd"] == {"step": 2.0, "steps": 2, "update": "sign"}
    assert all(len(h) == 64 for h in doc["weights_sha256"].values())
    assert "| clean mAP50 |" in out.with_suffix(".md").read_text()
    assert doc["settings"]["n_boot"] == 50
    for r in doc["rows"][1:]:
        ci = r["black_box_drop_ci"]
        assert ci is not None and set(ci) == {"lo", "hi"}
        if ci["lo"] is not None:
            assert ci["lo"] <= ci["hi"]
    assert "interval" in goals["ablation_black_box_drop"]


def test_held_out_restricts_the_leave_one_out_ensembles(tmp_path):
    import pytest

    from advdet.data.shapes import generate_shapes

    generate_shapes(tmp_path / "shp", train=0, val=2, seed=0, workers=1)
    mod = _module()
    out = tmp_path / "regime.json"
    common = ["--models", "yolov3,ssd_vgg,fcos", "--surrogates", "ssd_vgg", "--attacks", "pgd", "--images", "2",
              "--data", str(tmp_path / "shp" / "val"), "--pgd-steps", "1", "--batch-size", "2", "--n-boot", "0"]
    assert mod.main(common + ["--held-out", "yolov3", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["label"] for r in doc["rows"]][3:] == ["ens-pgd (all but yolov3)"]
    assert set(doc["goals"]["leave_one_out_held_out_drop"]) == {"yolov3"}
    assert doc["settings"]["held_out"] == ["yolov3"]
    with pytest.raises(ValueError, match=r"--held-out names models that are not victims: \['retinanet'\]"):
        mod.main(common + ["--held-out", "retinanet"])


def test_drop_interval_pairs_each_resample_with_the_clean_row():
    import numpy as np

    mod = _module()
    # one victim, three resamples: clean 0.8 / 0.5 / 1.0, adversarial 0.4 / 0.5 / 0.0 -> drops 0.5, 0, 1
    cells = {(0, "a"): np.array([0.8, 0.5, 1.0]), (1, "a"): np.array([0.4, 0.5, 0.0])}
    ci = mod.drop_interval({"_bootstrap_samples": {"cells": cells}}, 1, ["a"])
    # numpy's linear quantiles of [0, 0.5, 1] at 2.5 % and 97.5 %: 0.025 and 0.975
    assert abs(ci["lo"] - 0.025) < 1e-12 and abs(ci["hi"] - 0.975) < 1e-12
    # a second victim whose clean mAP is 0 on the first resample is left out there: mean drops are
    # 0.5 (a alone), (0 + 0.5) / 2 = 0.25, (1 + 0) / 2 = 0.5
    cells.update({(0, "b"): np.array([0.0, 0.4, 0.2]), (1, "b"): np.array([0.1, 0.2, 0.2])})
    ci = mod.drop_interval({"_bootstrap_samples": {"cells": cells}}, 1, ["a", "b"])
    lo, hi = np.quantile([0.5, 0.25, 0.5], [0.025, 0.975])
    assert abs(ci["lo"] - lo) < 1e-12 and abs(ci["hi"] - hi) < 1e-12
    assert mod.drop_interval({"_bootstrap_samples": None}, 1, ["a"]) is None
