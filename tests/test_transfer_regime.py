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
                   "--out", str(out)])
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
