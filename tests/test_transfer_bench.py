"""Failure rates (exact, on hand-made boxes) and the transfer benchmark on tiny untrained models."""

from __future__ import annotations

import math

import numpy as np

import pytest
import torch

from advdet.bench.failure_rates import FailureCounter, failure_rates, image_failure_counts, threshold_detections


def det(boxes, labels, scores=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.long),
            "scores": torch.tensor(scores if scores is not None else [0.9] * len(labels), dtype=torch.float32)}


# ------------------------------------------------------------------------------------------- failure rates
def test_failure_counts_one_image_exact():
    clean = det([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]], [0, 1, 2, 3])
    adv = det([[0, 0, 10, 11],        # IoU 10/11 with clean 0, same label -> kept
               [20, 20, 30, 30],      # same box as clean 1, other label -> misclassified
               [41, 40, 51, 50],      # IoU 90/110 = 0.818 with clean 2, same label -> kept
               [80, 80, 90, 90],      # no clean box -> hallucinated
               [64, 60, 74, 70]],     # IoU 60/140 = 0.43 with clean 3 -> no match; hallucinated, clean 3 gone
              [0, 2, 2, 1, 3])
    c = image_failure_counts(threshold_detections(clean), threshold_detections(adv))
    assert c == {"clean": 4, "adv": 5, "kept": 2, "misclassified": 1, "disappeared": 1, "hallucinated": 2}


def test_misclassified_only_when_no_overlapping_box_keeps_the_label():
    clean = det([[0, 0, 10, 10]], [0])
    # two overlapping adversarial boxes, one with the right label: kept, not misclassified
    c = image_failure_counts(clean, det([[0, 0, 10, 10], [0, 0, 10, 10]], [1, 0]))
    assert (c["kept"], c["misclassified"], c["disappeared"], c["hallucinated"]) == (1, 0, 0, 0)


def test_failure_rates_dataset_and_threshold():
    clean = [det([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1], [0.9, 0.2]),   # second below 0.3: ignored
             det([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1]),
             det(torch.zeros(0, 4).tolist(), [])]
    adv = [det([[0, 0, 10, 10]], [1]),                                       # misclassified
           det([[20, 20, 30, 30], [50, 50, 60, 60], [0, 0, 10, 10]], [1, 4, 0], [0.9, 0.9, 0.29]),
           det([[5, 5, 9, 9]], [2], [0.5])]                                   # hallucinated
    r = failure_rates(clean, adv)
    # clean detections: 1 + 2 + 0 = 3; image 2: box 0 disappears (its match scores 0.29), box 1 kept
    assert r["clean_detections"] == 3 and r["images"] == 3
    assert r["misclassification"] == pytest.approx(1 / 3)
    assert r["disappearance"] == pytest.approx(1 / 3)
    assert r["kept"] == pytest.approx(1 / 3)
    # hallucinated: image 2 [50..60] box, image 3 one box -> 2 over 3 images
    assert r["hallucination"] == pytest.approx(2 / 3)
    # a lower threshold brings the 0.29 box in: image 2's box 0 is kept, image 1's 0.2 box disappears
    r2 = failure_rates(clean, adv, score_thresh=0.1)
    assert r2["clean_detections"] == 4
    assert r2["disappearance"] == pytest.approx(1 / 4) and r2["kept"] == pytest.approx(2 / 4)


def test_failure_rates_identity_and_empty():
    clean = [det([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1])]
    r = failure_rates(clean, clean)
    assert (r["disappearance"], r["misclassification"], r["hallucination"], r["kept"]) == (0.0, 0.0, 0.0, 1.0)
    empty = FailureCounter().rates()
    assert empty["disappearance"] is None and empty["hallucination"] is None
    with pytest.raises(ValueError, match="2 clean but 1"):
        failure_rates(clean * 2, clean)
    r = failure_rates(clean, [det(torch.zeros(0, 4).tolist(), [])])
    assert r["disappearance"] == 1.0 and r["hallucination"] == 0.0 and not math.isnan(r["disappearance"])


# ------------------------------------------------------------------------------------------- transfer benchmark
import json  # noqa: E402

from advdet.attacks.quantize import quantize_adv  # noqa: E402
from advdet.attacks.registry import build_attack  # noqa: E402
from advdet.bench.transfer import transfer_matrix  # noqa: E402
from advdet.bench.transfer_report import json_ready, transfer_report, transfer_table  # noqa: E402
from advdet.bench.transfer_rows import ABLATION, NO_ATTACK, plan_rows  # noqa: E402
from advdet.data.collate import collate_detection  # noqa: E402
from advdet.data.letterbox import reletterbox  # noqa: E402
from advdet.data.registry import build_dataset  # noqa: E402
from advdet.data.shapes import SHAPE_CLASSES, write_shapes_split  # noqa: E402
from advdet.metrics.coco_map import coco_map  # noqa: E402
from advdet.models.evaluate import evaluate_detector, predictions_to_coco  # noqa: E402

K = len(SHAPE_CLASSES)
FAST = {"dfool": {"steps": 1}, "cls-pgd": {"steps": 1}}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_shapes")
    write_shapes_split(root, "val", 3, seed=0, workers=1)
    return str(root)


@pytest.fixture(scope="module")
def tiny_models():
    from advdet.models.classifier import small_classifier
    from advdet.models.ssd_vgg import ssd_vgg_small
    from advdet.models.torchvision_adapter import retinanet_tiny
    from advdet.models.yolov3 import yolov3_small

    torch.manual_seed(0)
    return {"yolo": yolov3_small(num_classes=K, input_size=64).eval(),
            "ssd": ssd_vgg_small(num_classes=K, input_size=64, width=0.125).eval(),
            "retina": retinanet_tiny(num_classes=K, input_size=96).eval(),   # another input size
            "classifier": small_classifier(num_classes=K, input_size=64).eval()}


@pytest.fixture(scope="module")
def result(tiny_data, tiny_models):
    return transfer_matrix(["yolo"], ["dfool", "cls-pgd"], ["yolo", "ssd", "retina"], tiny_data,
                           models=tiny_models, limit=3, batch_size=4, seed=3, attack_kwargs=FAST, progress=False,
                           examples=1, device="cpu")


def test_transfer_table_structure(result):
    assert [r["label"] for r in result["rows"]] == [NO_ATTACK, ABLATION, "dfool", "cls-pgd"]
    assert [r["kind"] for r in result["rows"]] == ["reference", "reference", "detector", "classifier"]
    assert result["victims"] == ["yolo", "ssd", "retina"] and result["images"] == 3
    dfool, clsr = result["rows"][2], result["rows"][3]
    assert dfool["surrogate"] == "yolo" and clsr["surrogate"] == "classifier"
    assert dfool["white_box"]["victim"] == "yolo" and clsr["white_box"] is None
    assert dfool["black_box"]["victims"] == ["ssd", "retina"]
    # rows without a detector surrogate average over the same black-box victims
    assert result["rows"][0]["black_box"]["victims"] == ["ssd", "retina"]
    for r in result["rows"]:
        m = r["metrics"]
        bb = [m[v]["map50"] for v in r["black_box"]["victims"] if m[v]["map50"] >= 0]
        assert r["black_box"]["map50"] == pytest.approx(sum(bb) / len(bb))
        for v in result["victims"]:
            assert set(m[v]) >= {"map", "map50", "map75", "ap_per_class"}
            assert set(m[v]["ap_per_class"]) == set(SHAPE_CLASSES)
    # budgets hold on the quantised images; the Gaussian ablation is unbounded (sigma 9)
    assert 0 < dfool["perturbation"]["rmse"] and dfool["perturbation"]["linf_max"] <= 16
    assert 0 < clsr["perturbation"]["linf_max"] <= 2  # one sign step of 2
    assert 8.0 < result["rows"][1]["perturbation"]["rmse"] < 10.0
    # failure rates against itself: nothing changes
    for v in result["victims"]:
        f = result["rows"][0]["failure"][v]
        assert f["hallucination"] == 0.0 and f["disappearance"] in (0.0, None)
    json.dumps(json_ready(result))  # JSON-ready
    cols, rows = transfer_table(result)
    assert cols == ["attack", "yolo", "ssd", "retina", "black-box mean", "RMSE"] and len(rows) == 4


def test_no_attack_row_equals_direct_evaluation(result, tiny_data, tiny_models):
    for v in ("yolo", "ssd", "retina"):
        det = tiny_models[v]
        ds = build_dataset(tiny_data, size=det.input_size)
        direct = evaluate_detector(det, ds, batch_size=2, limit=3)
        for k in ("map", "map50", "map75"):
            assert result["rows"][0]["metrics"][v][k] == pytest.approx(direct[k], abs=1e-9)


def test_attack_row_equals_direct_evaluation(result, tiny_data, tiny_models):
    """Ablation row, victims ssd (same size as the crafting size) and retina (re-letterboxed): recompute."""
    ds = build_dataset(tiny_data, size=64)
    x, targets = collate_detection([ds[i] for i in range(3)])
    atk = build_attack("gaussian", None, valid_only=True, seed=3)
    atk.manual_seed(3 + 0)
    from advdet.attacks.batches import letterbox_mask

    mask = letterbox_mask([t["letterbox"] for t in targets], 64, 64)
    q = quantize_adv(atk(x, None, mask=mask), x, None, mask=mask)
    for v in ("ssd", "retina"):
        det = tiny_models[v]
        if det.input_size == 64:
            xv, tv = q.float() / 255, targets
        else:
            xv, pv = reletterbox(q, [t["letterbox"] for t in targets], det.input_size)
            tv = [{"letterbox": p, "image_id": t["image_id"]} for p, t in zip(pv, targets)]
        with torch.no_grad():
            res = predictions_to_coco(det.predict(xv), tv, ds.label_to_cat_id)
        direct = coco_map(ds.coco_gt, res, "bbox", image_ids=[int(t["image_id"]) for t in targets])
        for k in ("map", "map50", "map75"):
            assert result["rows"][1]["metrics"][v][k] == pytest.approx(direct[k], abs=1e-9)


def test_same_seed_same_numbers(result, tiny_data, tiny_models):
    again = transfer_matrix(["yolo"], ["dfool", "cls-pgd"], ["yolo", "ssd", "retina"], tiny_data,
                            models=tiny_models, limit=3, batch_size=4, seed=3, attack_kwargs=FAST, progress=False,
                            examples=0, relevance=False, device="cpu")
    strip = lambda r: [{k: v for k, v in row.items() if k != "seconds"} for row in r["rows"]]  # noqa: E731
    assert strip(json_ready(again)) == strip(json_ready(result))


def test_reletterbox_same_size_is_exact_and_other_size_matches_letterbox(tiny_data):
    ds = build_dataset(tiny_data, size=64)
    item = ds[0]
    u8 = (item["image"] * 255).round().to(torch.uint8)[None]
    same, p_same = reletterbox(u8, [item["letterbox"]], 64)
    assert torch.equal(same, u8.float() / 255) and p_same[0] == item["letterbox"]
    big, p_big = reletterbox(u8, [item["letterbox"]], 96)
    ref = build_dataset(tiny_data, size=96)[0]
    assert p_big[0] == ref["letterbox"]
    inside = ref["image"].abs().sum(0) > 0
    assert big[0].sum(0)[~inside].abs().max() == 0             # padding stays zero
    # the content is the upsampled 64-px content: close to the 96-px letterbox of the original image
    assert (big[0] - ref["image"])[:, inside].abs().mean() < 0.08


def test_plan_rows_sweeps():
    from advdet.attacks.base import Attack

    class Toy(Attack):
        name, description = "toy", "toy attack with RAD's node parameters"

        def __init__(self, model, *, eps=16.0, nodes="static", m=20, threshold=-1.0, node_type="cls",
                     transforms=None, **kw):
            super().__init__(model, eps=eps, **kw)

    class Plain(Attack):
        name, description = "plain", "no node parameters, no transforms"

        def __init__(self, model, *, eps=16.0, seed=0):
            super().__init__(model, eps=eps, seed=seed)

    reg = {"toy": Toy, "plain": Plain, "gaussian": object}
    notes: list[str] = []
    rows = plan_rows(["s1"], ["toy", "plain"], sweep="nodes", sweep_values=["static:10", "dynamic:-2"],
                     registry=reg, notes=notes)
    assert [r.label for r in rows] == [NO_ATTACK, ABLATION, "toy [static:10]", "toy [dynamic:-2]", "plain"]
    assert rows[2].kwargs == {"eps": 16.0, "nodes": "static", "m": 10}
    assert rows[3].kwargs == {"eps": 16.0, "nodes": "dynamic", "threshold": -2.0}
    assert notes == ["plain: no 'nodes' parameter, run once without the nodes sweep"]
    rows = plan_rows(["s1", "s2"], ["toy"], eps=[4, 8], registry=reg)
    assert [r.label for r in rows[2:]] == ["toy (s1) eps=4", "toy (s1) eps=8", "toy (s2) eps=4", "toy (s2) eps=8"]
    assert [r.kwargs["eps"] for r in rows[2:]] == [4.0, 8.0, 4.0, 8.0]
    rows = plan_rows(["s1"], ["toy"], sweep="technique", registry=reg)
    assert [r.kwargs["technique"] for r in rows[2:]] == ["none", "DI", "TI", "SI", "MI"]
    rows = plan_rows(["s1"], ["toy"], sweep="node_type", registry=reg)
    assert [r.kwargs["node_type"] for r in rows[2:]] == ["size", "loc", "cls"]
    with pytest.raises(ValueError, match="one sweep at a time"):
        plan_rows(["s1"], ["toy"], eps=[4, 8], sweep="nodes", registry=reg)
    with pytest.raises(KeyError, match="unknown attack 'nope'"):
        plan_rows(["s1"], ["nope"], registry=reg)


def test_eps_sweep_and_technique_sweep_report(tiny_data, tiny_models, tmp_path):
    res = transfer_matrix(["yolo"], ["dfool"], ["yolo", "ssd"], tiny_data, models=tiny_models, limit=2,
                          batch_size=2, eps=[4, 8], attack_kwargs=FAST, progress=False, examples=1,
                          out_dir=tmp_path / "rep", device="cpu")
    labels = [r["label"] for r in res["rows"]]
    assert labels == [NO_ATTACK, ABLATION, "dfool eps=4", "dfool eps=8"]
    assert res["rows"][2]["perturbation"]["linf_max"] <= 4 and res["rows"][3]["perturbation"]["linf_max"] <= 8
    assert res["sweep"] == {"name": "eps", "values": [4.0, 8.0]}
    files = {p.name for p in (tmp_path / "rep").iterdir()}
    assert {"report.md", "index.html", "transfer.json", "fig_dfool_map_against_eps.png"} <= files
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Transfer: box mAP (x100)" in md and "| dfool eps=4 |" in md
    assert json.loads((tmp_path / "rep" / "transfer.json").read_text())["rows"][3]["label"] == "dfool eps=8"
    res = transfer_matrix(["yolo"], ["dfool"], ["ssd"], tiny_data, models=tiny_models, limit=2, batch_size=2,
                          sweep="technique", sweep_values=["none", "TI"], attack_kwargs=FAST, progress=False,
                          examples=0, device="cpu")
    assert [r["label"] for r in res["rows"][2:]] == ["dfool [none]", "dfool [TI]"]
    assert res["rows"][2]["metrics"]["ssd"]["map"] >= 0


def test_unavailable_models_and_attacks(tiny_data, tiny_models):
    from advdet.bench.transfer import ModelUnavailable

    models = {k: v for k, v in tiny_models.items() if k != "classifier"}
    with pytest.raises(KeyError, match="unknown attack 'no-such-attack'"):
        transfer_matrix(["yolo"], ["no-such-attack"], ["ssd"], tiny_data, models=models, limit=1, progress=False)
    # a classifier without weights (a torchvision model without a weights file is never "trained"):
    # skipped with a note, its attacks dropped
    res = transfer_matrix(["yolo"], ["no-such-attack", "cls-pgd", "dfool"], ["ssd"], tiny_data, models=models,
                          limit=1, progress=False, skip_unavailable=True, attack_kwargs=FAST, examples=0,
                          classifier="torchvision:retinanet_resnet50_fpn", device="cpu")
    assert [r["label"] for r in res["rows"]] == [NO_ATTACK, ABLATION, "dfool"]
    assert any("no-such-attack" in s for s in res["skipped"])
    assert any("cls-pgd" in s for s in res["skipped"])
    with pytest.raises(ModelUnavailable, match="no trained weights"):
        transfer_matrix(["torchvision:retinanet_resnet50_fpn"], ["dfool"], ["ssd"], tiny_data, models=models, limit=1,
                        progress=False)


def test_report_of_result_has_tables_figures_and_grids(result, tmp_path):
    rep = transfer_report(result)
    out = rep.write(tmp_path)
    md = (out / "report.md").read_text()
    for title in ("## Transfer: box mAP (x100)", "## Transfer: box mAP50 (x100)", "## Failure rates",
                  "## Attack x victim heat map", "## Per-class AP of ssd", "## Image "):
        assert title in md
    # grid: 4 rows (No Attack, Ablation, dfool, cls-pgd) x (image, perturbation, relevance, 3 victims)
    grid = [p for p in out.glob("grid_*.png")]
    assert len(grid) == 4 * 6
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == len(list(out.glob("*.png")))
    # the clean row's relevance map is the surrogate's, and the adversarial row's differs
    ex = result["_examples"][0]["rows"]
    assert ex[0]["relevance"]["model"] == "yolo"
    assert not np.array_equal(ex[2]["relevance"]["after"], ex[0]["relevance"]["before"])


def test_cli_bench_transfer_end_to_end(tiny_data, tmp_path):
    """`advdet bench transfer` on untrained zoo models (explicitly allowed), 2 images, 1-step attacks."""
    from typer.testing import CliRunner

    from advdet.cli import app

    out_json, rep = tmp_path / "t.json", tmp_path / "rep"
    r = CliRunner().invoke(app, ["bench", "transfer", "--surrogate", "yolov3", "--victims", "yolov3,ssd_vgg",
                                 "--attacks", "dfool,cls-pgd,not-an-attack", "--skip-unavailable",
                                 "--set", "dfool.steps=1", "--set", "cls-pgd.steps=1", "--data", tiny_data,
                                 "--limit", "2", "--batch-size", "2", "--allow-untrained", "--examples", "1",
                                 "--no-relevance", "--json", str(out_json), "--report", str(rep),
                                 "--device", "cpu"], terminal_width=200)
    assert r.exit_code == 0, r.output
    for word in ("No Attack", "Ablation", "dfool", "cls-pgd", "black-box mean", "not-an-attack",
                 "95 % bootstrap intervals"):
        assert word in r.output
    res = json.loads(out_json.read_text())
    assert [row["label"] for row in res["rows"]] == [NO_ATTACK, ABLATION, "dfool", "cls-pgd"]
    from advdet.models.zoo import zoo_entry

    assert res["models"]["yolov3"]["trained"] is zoo_entry("yolov3").trained and res["images"] == 2
    assert res["models"]["classifier"]["trained"] is zoo_entry("classifier").trained
    assert res["rows"][2]["settings"] == {"steps": 1, "eps": 16.0}
    assert {"index.html", "report.md", "fig_attack_x_victim_heat_map.png"} <= {p.name for p in rep.iterdir()}
    # without --allow-untrained an untrained model is an error with a clear message, exit code 2
    r = CliRunner().invoke(app, ["bench", "transfer", "--surrogate", "torchvision:retinanet_resnet50_fpn",
                                 "--victims", "ssd_vgg", "--attacks", "dfool", "--data", tiny_data, "--limit", "1"],
                           terminal_width=200)
    assert r.exit_code == 2 and "no trained weights" in r.output


def test_bootstrap_intervals_of_every_cell_and_black_box_mean(result, tmp_path):
    """The default run carries 95 % bootstrap intervals of mAP50 (1000 resamples): one per cell and per
    black-box mean, centred on the table's own numbers; without a RAD row there is nothing to pair."""
    block = result["bootstrap"]
    assert (block["n_boot"], block["level"], block["images"], block["metric"]) == (1000, 0.95, 3, "map50")
    assert [r["label"] for r in block["rows"]] == [r["label"] for r in result["rows"]]
    for r, ci in zip(result["rows"], block["rows"]):
        for v in result["victims"]:
            m = r["metrics"][v]["map50"]
            cell = ci["cells"][v]
            assert cell["value"] == (None if m < 0 else pytest.approx(m))
            if cell["value"] is not None:
                assert cell["lo"] <= cell["hi"]
        assert ci["black_box"]["value"] == pytest.approx(r["black_box"]["map50"])
    assert block["paired"] == []
    json.dumps(json_ready(result))
    md = transfer_report(result).write(tmp_path).joinpath("report.md").read_text()
    assert "## Transfer: box mAP50 (x100) with bootstrap intervals" in md and "1000 resamples" in md


def test_bootstrap_paired_rows_and_off_switch(tiny_data, tiny_models, tmp_path, caplog):
    kw = dict(models=tiny_models, limit=2, batch_size=2, attack_kwargs=FAST, progress=False, examples=0,
              device="cpu", relevance=False)
    res = transfer_matrix(["yolo"], ["dfool"], ["yolo", "ssd"], tiny_data, n_boot=50, boot_seed=1,
                          paired_with="dfool", **kw)
    # the per-image matches reproduce the evaluator's mAP50 of every cell (else a warning is logged)
    assert "differs from the evaluator" not in caplog.text
    block = res["bootstrap"]
    assert block["n_boot"] == 50 and block["seed"] == 1 and block["reference"] == "dfool"
    assert [(p["row"], p["baseline"]) for p in block["paired"]] == [("dfool", NO_ATTACK), ("dfool", ABLATION)]
    p = block["paired"][0]
    assert p["victims"] == ["ssd"]
    diff = res["rows"][2]["metrics"]["ssd"]["map50"] - res["rows"][0]["metrics"]["ssd"]["map50"]
    assert p["black_box"]["value"] == pytest.approx(diff) and p["cells"]["ssd"]["value"] == pytest.approx(diff)
    md = transfer_report(res).write(tmp_path).joinpath("report.md").read_text()
    assert "## Paired: dfool minus each baseline" in md
    again = transfer_matrix(["yolo"], ["dfool"], ["yolo", "ssd"], tiny_data, n_boot=50, boot_seed=1,
                            paired_with="dfool", **kw)
    assert again["bootstrap"] == block  # seeded
    # the resampled values stay with the result (not in the JSON) for statistics derived later
    kept = res["_bootstrap_samples"]
    assert kept["indices"].shape == (50, 2) and kept["cells"][(2, "ssd")].shape == (50,)
    assert "_bootstrap_samples" not in json_ready(res)
    off = transfer_matrix(["yolo"], ["dfool"], ["ssd"], tiny_data, n_boot=0, **kw)
    assert off["bootstrap"] is None
    md = transfer_report(off).write(tmp_path / "off").joinpath("report.md").read_text()
    assert "bootstrap" not in md


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_release_memory_returns_fragmented_heap_pages():
    # freed blocks scattered among live ones stay resident until trimmed (what crept up in long RAD runs)
    from advdet.bench.runtime import release_memory

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    base = rss_mb()
    blocks = [bytearray(32 * 1024) for _ in range(8000)]  # 250 MB in 32 KB heap blocks
    keep = blocks[::16]  # 1 in 16 stays alive, pinning the heap's top
    del blocks
    held = rss_mb()
    assert release_memory() is True
    after = rss_mb()
    assert held - base > 150, (base, held)
    assert held - after > 120, (held, after)  # most of the freed 234 MB goes back to the system
    assert len(keep) == 500


def test_rad_rows_carry_diagnostics_into_json_and_report(tiny_data, tiny_models, tmp_path):
    """RAD's diagnostics (issue 20) reach the row of the JSON and the report: on the untrained tiny YOLO
    every objectness node is gated by the output ReLU, so every step came from the second term."""
    res = transfer_matrix(["yolo"], ["rad", "dfool"], ["yolo", "ssd"], tiny_data, models=tiny_models, limit=2,
                          batch_size=2, attack_kwargs={"rad": {"steps": 2, "transforms": []}, **FAST},
                          progress=False, examples=0, n_boot=0, device="cpu")
    rad = next(r for r in res["rows"] if r["attack"] == "rad")
    d = rad["diagnostics"]
    assert d["gradient_evaluations"] == 2 * 2 and d["second_term_share"] == 1.0
    assert len(d["relevance_per_iteration"]) == 2 and d["relevance_per_iteration"][0] == 0.0
    assert 0 < d["mean_abs_delta"] <= 16
    assert all(r["diagnostics"] is None for r in res["rows"] if r["attack"] != "rad")
    md = transfer_report(json_ready(res)).write(tmp_path).joinpath("report.md").read_text()
    assert "## RAD diagnostics" in md


def test_ensemble_surrogate_and_leave_one_out_rows(tiny_data, tiny_models):
    from advdet.data.errors import AdvdetError

    res = transfer_matrix(["yolo+ssd"], ["pgd"], ["yolo", "ssd", "retina"], tiny_data, models=tiny_models, limit=2,
                          batch_size=2, seed=1, attack_kwargs={"pgd": {"steps": 1}}, progress=False, examples=0,
                          relevance=False, device="cpu", n_boot=0, leave_one_out=["yolo", "ssd"])
    rows = {r["label"]: r for r in res["rows"]}
    assert list(rows) == [NO_ATTACK, ABLATION, "pgd", "ens-pgd without yolo", "ens-pgd without ssd"]
    assert rows["pgd"]["surrogate"] == "yolo+ssd" and rows["pgd"]["black_box"]["victims"] == ["retina"]
    assert rows["pgd"]["white_box"] is None
    assert rows["ens-pgd without yolo"]["held_out"] == "yolo"
    assert rows["ens-pgd without yolo"]["black_box"]["victims"] == ["yolo"]
    assert rows["ens-pgd without ssd"]["surrogate"] == "yolo"
    assert res["leave_one_out"] == ["yolo", "ssd"]
    assert set(res["models"]["yolo+ssd"]["members"]) == {"yolo", "ssd"}
    json.dumps(json_ready(res))
    # the ensembles of the leave-one-out protocol need one input size (retina is 96 px, the others 64)
    with pytest.raises(AdvdetError, match="share one input size"):
        transfer_matrix([], ["pgd"], ["yolo", "ssd", "retina"], tiny_data, models=tiny_models, limit=2,
                        progress=False, examples=0, relevance=False, device="cpu", n_boot=0, leave_one_out=True)


def test_cli_bench_transfer_leave_one_out_and_unknown_member(tiny_data, tmp_path):
    """`--leave-one-out` (no --surrogate: only the leave-one-out rows) and `a+b` with an unknown member."""
    from typer.testing import CliRunner

    from advdet.cli import app

    out_json = tmp_path / "loo.json"
    r = CliRunner().invoke(app, ["bench", "transfer", "--leave-one-out", "--victims", "yolov3,ssd_vgg",
                                 "--attacks", "pgd", "--set", "pgd.steps=1", "--set", "pgd.weights=loss",
                                 "--data", tiny_data, "--limit", "1", "--batch-size", "1", "--allow-untrained",
                                 "--no-ci", "--no-relevance", "--json", str(out_json), "--device", "cpu"],
                           terminal_width=200)
    assert r.exit_code == 0, r.output
    res = json.loads(out_json.read_text())
    assert [row["label"] for row in res["rows"]] == [NO_ATTACK, ABLATION, "ens-pgd without yolov3",
                                                     "ens-pgd without ssd_vgg"]
    assert [row["black_box"]["victims"] for row in res["rows"][2:]] == [["yolov3"], ["ssd_vgg"]]
    assert "leave-one-out over yolov3, ssd_vgg" in " ".join(r.output.split())
    r = CliRunner().invoke(app, ["bench", "transfer", "--surrogate", "yolov3+nope", "--victims", "yolov3",
                                 "--attacks", "pgd", "--data", tiny_data, "--limit", "1", "--allow-untrained"],
                           terminal_width=200)
    assert r.exit_code == 2 and "unknown member 'nope'" in " ".join(r.output.split()), r.output
