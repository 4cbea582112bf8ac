"""The robustness benchmark (RobustDet Table 1 / Fig. 7a-b): real mAP50 numbers on a toy detector whose
behaviour under attack is known exactly, the VOC07 and COCO50 routes, RobustDet's DAG, the refusal of
untrained models, and the CLI with its JSON and report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from advdet.attacks.registry import build_attack
from advdet.attacks.dag_robustdet import RobustDetDAG
from advdet.bench.loading import UntrainedModelError, load_detector
from advdet.bench.robustness import robustness_steps_sweep, robustness_table
from advdet.bench.robustness_report import table_rows
from advdet.bench.robustness_scoring import load_eval_dataset
from advdet.models.box_ops import match_priors
from advdet.models.detector import Detector, DenseOutput, NMSConfig, postprocess_dense

S, CELL = 64, 16
COLORS = {0: (255, 0, 0), 1: (0, 255, 0)}  # class 0 red squares, class 1 green squares


class ToyDetector(Detector):
    """A hand-built, differentiable detector on a 4 x 4 grid of 16 px cells (anchors = the cells).

    Per cell, with (R, G) the mean red and green of the cell: z_0 = 20 (R - G) - 10 (red squares),
    z_1 = 20 (G - R) - 10 (green squares), background logit 0 (softmax with background). The boxes are
    the cells, so a red or green square filling a cell is detected exactly with score ~1; the boxes do not
    depend on the image, so A_loc has a zero gradient and cannot change anything.
    """

    family = "toy"

    def __init__(self):
        conv = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([[20.0, -20.0, 0.0], [-20.0, 20.0, 0.0]]).view(2, 3, 1, 1))
            conv.bias.fill_(-10.0)
        super().__init__(conv, num_classes=2, input_size=S)
        g = torch.arange(0, S, CELL, dtype=torch.float32)
        yy, xx = torch.meshgrid(g, g, indexing="ij")
        cells = torch.stack([xx.flatten(), yy.flatten(), xx.flatten() + CELL, yy.flatten() + CELL], 1)
        self.register_buffer("cells", cells, persistent=False)

    def dense(self, x):
        self.check_input(x)
        z = self.model(F.avg_pool2d(x, CELL)).flatten(2).transpose(1, 2)  # (B, 16, 2)
        logits = torch.cat([z.new_zeros(z.shape[:2] + (1,)), z], -1)
        boxes = self.cells[None].expand(x.shape[0], -1, -1)
        return DenseOutput(logits=logits, boxes=boxes, anchors=boxes, score_mode="softmax_bg")

    @torch.no_grad()
    def predict(self, x):
        return postprocess_dense(self.dense(x), NMSConfig(0.05, 0.45, 100, 100), S)

    def loss(self, x, targets):
        d = self.dense(x)
        labels = []
        for t in targets:
            idx, pos = match_priors(t["boxes"].to(self.cells), self.cells, 0.5)
            lab = torch.zeros(len(self.cells), dtype=torch.long, device=x.device)
            if t["boxes"].numel():
                lab = torch.where(pos, t["labels"].to(x.device).long()[idx] + 1, lab)
            labels.append(lab)
        labels = torch.stack(labels)
        npos = (labels > 0).sum().clamp(min=1)
        cls = F.cross_entropy(d.logits.reshape(-1, 3), labels.reshape(-1), reduction="sum") / npos
        return {"cls": cls, "loc": 0.0 * d.logits.sum()}


#: per image: (cell row, cell col, class); image 2 also gets a grey "difficult" object in the VOC copy
TOY_OBJECTS = [[(0, 0, 0), (2, 3, 1)], [(1, 1, 1)], [(3, 0, 0), (0, 2, 0), (2, 2, 1)], [(1, 3, 1)]]


def _toy_image(objs) -> np.ndarray:
    img = np.zeros((S, S, 3), np.uint8)
    for r, c, k in objs:
        img[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = COLORS[k]
    return img


def write_toy_coco(root: Path, num_categories: int = 2) -> Path:
    """4 toy images (64 x 64 PNG) with their COCO instances.json (classes red, green and unused extra
    ones up to ``num_categories``); returns the folder."""
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i, objs in enumerate(TOY_OBJECTS):
        Image.fromarray(_toy_image(objs)).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": S, "width": S})
        for r, c, k in objs:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": k + 1, "iscrowd": 0,
                         "bbox": [c * CELL, r * CELL, CELL, CELL], "area": CELL * CELL})
    names = ["red", "green"] + [f"unused{k}" for k in range(2, num_categories)]
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)]}
    (root / "instances.json").write_text(json.dumps(coco))
    return root


def write_toy_voc(root: Path) -> Path:
    """The same images as a Pascal VOC folder (JPEG, 1-based inclusive boxes; classes aeroplane /
    bicycle), plus an undetectable grey object marked difficult in image 2."""
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    names = []
    for i, objs in enumerate(TOY_OBJECTS):
        name = f"{i + 1:06d}"
        names.append(name)
        img = _toy_image(objs)
        extra = []
        if i == 2:
            img[CELL:2 * CELL, 0:CELL] = 128
            extra = [(1, 0, 0, 1)]
        Image.fromarray(img).save(root / "JPEGImages" / f"{name}.jpg", quality=100)
        xml = [f"<annotation><filename>{name}.jpg</filename><size><width>{S}</width><height>{S}</height>"
               "<depth>3</depth></size>"]
        for r, c, k, *diff in [(*o, 0) for o in objs] + extra:
            xml.append(f"<object><name>{('aeroplane', 'bicycle')[k]}</name><difficult>{diff[0]}</difficult>"
                       f"<bndbox><xmin>{c * CELL + 1}</xmin><ymin>{r * CELL + 1}</ymin>"
                       f"<xmax>{(c + 1) * CELL}</xmax><ymax>{(r + 1) * CELL}</ymax></bndbox></object>")
        (root / "Annotations" / f"{name}.xml").write_text("".join(xml) + "</annotation>")
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(names) + "\n")
    return root


@pytest.fixture(scope="module")
def toy_coco(tmp_path_factory):
    return write_toy_coco(tmp_path_factory.mktemp("toy") / "coco")


def test_toy_table_has_the_expected_numbers_and_layout(toy_coco):
    toy = ToyDetector()
    res = robustness_table(["toy"], ["clean", "cls", "loc", "cwa", "dag-robustdet"], toy_coco, eps=100, steps=1,
                           batch_size=3, detectors={"toy": toy}, progress=False)
    assert res["metric"] == "coco50" and res["images"] == 4 and res["eps"] == 100 and res["steps"] == 1
    m = res["map50"]["toy"]
    # clean: every square detected exactly; A_cls at eps 100 moves the cell means of R and G by 0.39 and
    # every square vanishes (z = 10 - 40 * 0.39 < 0); A_loc has a zero gradient (boxes are fixed); one
    # DAG step of gamma 0.5 changes nothing.
    # CWA on a non-SSD family sums per-class losses in which the other classes' squares count as
    # background, so the squares of two-class images pull both ways and only some vanish.
    assert m["clean"] == pytest.approx(1.0) and m["loc"] == pytest.approx(1.0)
    assert m["cls"] == pytest.approx(0.0) and m["cwa"] < 0.9
    assert m["dag-robustdet"] == pytest.approx(1.0)
    assert set(res["seconds"]["toy"]) == {"clean", "cls", "loc", "cwa", "dag-robustdet"}
    assert res["attack_settings"]["toy"]["cls"]["eps"] == 100 and res["attack_settings"]["toy"]["cls"]["step"] == 100
    assert res["attack_settings"]["toy"]["dag-robustdet"]["attack"] == "dag-robustdet"
    json.dumps(res)  # JSON-able
    cols, rows = table_rows(res)
    assert cols == ["Method", "Clean", "A_cls", "A_loc", "CWA", "DAG (RobustDet)"]
    assert rows == [["toy", "100.0", "0.0", "100.0", f"{100 * m['cwa']:.1f}", "100.0"]]


def test_table_matches_an_independent_evaluation(toy_coco):
    """The cls column equals crafting with build_attack and scoring with pycocotools by hand."""
    from advdet.data.collate import collate_detection
    from advdet.models.evaluate import predictions_to_coco, score_results

    toy = ToyDetector()
    with torch.no_grad():
        toy.model.bias[1] = -2.0  # green squares survive eps 100, red ones do not: a partial drop
    res = robustness_table(["toy"], ["clean", "cls"], toy_coco, eps=100, steps=2, batch_size=2,
                           detectors={"toy": toy}, progress=False)
    ds = load_eval_dataset(toy_coco, size=S)
    images, targets = collate_detection([ds[i] for i in range(len(ds))])
    atk = build_attack("cls", toy, eps=100, step=100, steps=2)
    tg = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    x_adv = torch.cat([atk(images[i:i + 2], tg[i:i + 2]) for i in (0, 2)])
    results = predictions_to_coco(toy.predict(x_adv), targets, ds.label_to_cat_id)
    ref = score_results(ds.coco_gt, results, [t["image_id"] for t in targets], False)["map50"]
    assert res["map50"]["toy"]["cls"] == pytest.approx(ref)
    assert 0.0 < ref < res["map50"]["toy"]["clean"]


def test_bootstrap_intervals_and_paired_differences_to_the_first_model(toy_coco):
    """The toy detector finds every square on clean images: mAP50 is 1 on every resample, so its interval
    is [1, 1]; a weaker copy (red squares lost under A_cls) is compared with it on the same resamples."""
    from advdet.bench.intervals import robustness_interval_table, robustness_paired_table

    weak = ToyDetector()
    with torch.no_grad():
        weak.model.bias[1] = -2.0
    res = robustness_table(["toy", "weak"], ["clean", "cls"], toy_coco, eps=100, steps=1, n_boot=200,
                           detectors={"toy": ToyDetector(), "weak": weak}, progress=False)
    ci = res["intervals"]
    assert (ci["n_boot"], ci["images"], ci["baseline"], ci["level"]) == (200, 4, "toy", 0.95)
    assert ci["map50"]["toy"]["clean"] == {"value": pytest.approx(1.0), "lo": pytest.approx(1.0),
                                           "hi": pytest.approx(1.0)}
    for m in ("toy", "weak"):
        for a in ("clean", "cls"):
            assert ci["map50"][m][a]["value"] == pytest.approx(res["map50"][m][a])
    d = ci["paired"]["weak"]["cls"]
    assert d["value"] == pytest.approx(res["map50"]["weak"]["cls"] - res["map50"]["toy"]["cls"])
    assert d["lo"] <= d["hi"]
    json.dumps(res)
    cols, rows = robustness_interval_table(res)
    assert cols == ["Method", "clean", "cls"] and rows[0][1] == "100.0 [100.0, 100.0]"
    cols, rows = robustness_paired_table(res)
    assert cols[0] == "Method - toy" and rows[0][0] == "weak"
    assert robustness_table(["toy"], ["clean"], toy_coco, n_boot=0, detectors={"toy": ToyDetector()},
                            progress=False)["intervals"] is None
    sw = robustness_steps_sweep(["toy"], ["cls"], toy_coco, steps=[1, 2], eps=100, n_boot=50,
                                detectors={"toy": ToyDetector()}, progress=False)
    assert set(sw["intervals"]["map50"]["toy"]) == {"clean", "cls@1", "cls@2"}


def test_voc07_route_on_a_voc_folder_ignores_difficult_objects(tmp_path):
    write_toy_voc(tmp_path / "VOC2007")
    res = robustness_table(["toy"], ["clean", "cls"], tmp_path, eps=100, steps=1,
                           detectors={"toy": ToyDetector()}, progress=False)
    assert res["metric"] == "voc07" and res["images"] == 4
    # the grey difficult object is never detected: counted as a positive it would cap recall at 7/8
    assert res["map50"]["toy"]["clean"] == pytest.approx(1.0)
    assert res["map50"]["toy"]["cls"] == pytest.approx(0.0)
    per_class = res["scores"]["toy"]["clean"]["ap_per_class"]
    assert per_class[:2] == [pytest.approx(1.0), pytest.approx(1.0)] and per_class[2] is None
    # the same COCO data scored with the VOC07 rule
    coco = write_toy_coco(tmp_path / "coco")
    res2 = robustness_table(["toy"], ["clean"], coco, metric="voc07", detectors={"toy": ToyDetector()},
                            progress=False)
    assert res2["metric"] == "voc07" and res2["map50"]["toy"]["clean"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown metric"):
        robustness_table(["toy"], ["clean"], coco, metric="voc12", detectors={"toy": ToyDetector()}, progress=False)


def test_steps_sweep_and_determinism(toy_coco):
    toy = ToyDetector()
    with torch.no_grad():
        toy.model.bias[1] = -2.0
    # step 30 (not eps): after 1 step every square survives, after 3 the red ones vanish
    kw = dict(steps=[1, 3], eps=100, attack_kwargs={"cls": {"step": 30.0}}, detectors={"toy": toy}, progress=False)
    a = robustness_steps_sweep(["toy"], ["clean", "cls", "loc"], toy_coco, **kw)
    b = robustness_steps_sweep(["toy"], ["clean", "cls", "loc"], toy_coco, **kw)
    assert a["kind"] == "steps_sweep" and a["steps"] == [1, 3] and a["attacks"] == ["cls", "loc"]
    assert a["map50"] == b["map50"] and a["clean"] == b["clean"]
    cls = a["map50"]["toy"]["cls"]
    assert a["clean"]["toy"] == pytest.approx(1.0) and cls[0] == pytest.approx(1.0) and cls[1] < 0.5
    assert a["map50"]["toy"]["loc"] == [pytest.approx(1.0)] * 2
    assert a["attack_settings"]["toy"]["cls@3"]["steps"] == 3
    with pytest.raises(ValueError, match="steps"):
        robustness_steps_sweep(["toy"], ["cls"], toy_coco, steps=[0], detectors={"toy": toy}, progress=False)


def test_robustdet_dag_labels_step_size_and_reference_quirk():
    from advdet.models.ssd_vgg import ssd_vgg_small

    torch.manual_seed(0)
    ssd = ssd_vgg_small(num_classes=3, input_size=64).eval()
    x = torch.rand(2, 3, 64, 64)
    tg = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([2])},
          {"boxes": torch.tensor([[20.0, 4.0, 60.0, 30.0], [0.0, 30.0, 30.0, 60.0]]), "labels": torch.tensor([0, 1])}]
    atk = RobustDetDAG(ssd, steps=3, seed=1)
    x_adv = atk(x, tg)
    st = atk.last_state
    # every prior labelled by the SSD's own matching, background included; adversarial label != label
    assert torch.equal(st["label"], ssd.encode_targets(tg)[1])
    assert (st["adv"] != st["label"]).all() and st["adv"].min() >= 0 and st["adv"].max() <= 3
    assert (st["label"] > 0).any() and (st["adv"][st["label"] == 0] > 0).all()
    # the reference's quirk: the gradient of step t is taken at x0 + r_{t-1}; output clip(x0 + sum r_t)
    total, last = torch.zeros_like(x), torch.zeros_like(x)
    for _ in range(3):
        p = (x + last).clamp(0, 1).requires_grad_(True)
        z = ssd.dense(p).logits
        with torch.no_grad():
            act = z.argmax(-1) != st["adv"]
        obj = ((z.gather(-1, st["adv"][..., None]) - z.gather(-1, st["label"][..., None]))[..., 0] * act).sum()
        (g,) = torch.autograd.grad(obj, p)
        r = 0.5 / 255 * g / g.flatten(1).abs().amax(1).view(-1, 1, 1, 1)
        total, last = total + r, r
    assert torch.allclose(x_adv, (x + total).clamp(0, 1), atol=1e-6)
    # a single step moves by exactly gamma = 0.5 (0-255 units) in Linf
    one = RobustDetDAG(ssd, steps=1)(x, tg)
    assert (one - x).abs().flatten(1).amax(1).tolist() == pytest.approx([0.5 / 255] * 2, rel=1e-4)


def test_robustdet_dag_generic_path_raises_its_objective():
    toy = ToyDetector()
    x = torch.from_numpy(_toy_image(TOY_OBJECTS[0])).permute(2, 0, 1)[None].float() / 255
    x = (x * 0.6 + 0.2)  # off the [0, 1] bounds so every pixel can move both ways
    tg = [{"boxes": torch.tensor([[0.0, 0.0, 16.0, 16.0], [48.0, 32.0, 64.0, 48.0]]), "labels": torch.tensor([0, 1])}]
    atk = RobustDetDAG(toy, steps=40, gamma=8.0, accumulate=True, seed=0)
    x_adv = atk(x, tg)
    st = atk.last_state
    assert st["label"].tolist()[0].count(0) == 14 and st["label"][0, 0] == 1 and st["label"][0, 11] == 2

    def total(xx):
        z = toy.dense(xx).logits
        return (z.gather(-1, st["adv"][..., None]) - z.gather(-1, st["label"][..., None])).sum().item()

    assert total(x_adv) > total(x) + 1.0
    assert len(st["active_counts"]) == 40


def test_untrained_models_are_refused_unless_allowed(tmp_path, monkeypatch, toy_coco):
    import advdet.models.zoo as zoo
    from advdet.models.ssd_vgg import ssd_vgg_small
    from advdet.models.weights import save_weights

    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path / "empty_zoo")
    with pytest.raises(UntrainedModelError, match="no trained weights.*allow-untrained"):
        load_detector("ssd_vgg")
    with pytest.raises(UntrainedModelError):
        robustness_table(["ssd_vgg"], ["clean"], toy_coco, progress=False)
    with pytest.raises(UntrainedModelError, match="torchvision"):
        load_detector("torchvision:retinanet_tiny")
    with pytest.raises(ValueError, match="classifier"):
        load_detector("classifier", allow_untrained=True)
    det, origin = load_detector("ssd_vgg", allow_untrained=True)
    assert origin == "untrained" and det.input_size == 256
    torch.manual_seed(0)
    save_weights(ssd_vgg_small(num_classes=8, input_size=256), tmp_path / "w.safetensors", {})
    det2, origin2 = load_detector("ssd_vgg", weights=tmp_path / "w.safetensors")
    assert origin2 == str(tmp_path / "w.safetensors")
    assert not torch.equal(next(det.parameters()), next(det2.parameters()))
    with pytest.raises(KeyError, match="unknown attack"):
        robustness_table(["toy"], ["clean", "nope"], toy_coco, detectors={"toy": ToyDetector()}, progress=False)


def test_cli_table_sweep_json_and_report(tmp_path, toy_coco):
    from advdet.cli import app
    from advdet.models.ssd_vgg import ssd_vgg_small
    from advdet.models.weights import save_weights

    toy8 = write_toy_coco(tmp_path / "toy8", num_categories=8)  # the zoo's 8 shape classes

    torch.manual_seed(0)
    w = tmp_path / "w.safetensors"
    save_weights(ssd_vgg_small(num_classes=8, input_size=256), w, {})
    runner = CliRunner()
    base = ["bench", "robustness", "--models", "ssd_vgg", "--weights", f"ssd_vgg={w}", "--data", str(toy8),
            "--limit", "2", "--batch-size", "2"]
    res = runner.invoke(app, base + ["--attacks", "clean,cls,dag", "--steps", "1", "--json", str(tmp_path / "t.json"),
                                     "--report", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert "A_cls" in res.output and "DAG" in res.output and "ssd_vgg" in res.output
    out = json.loads((tmp_path / "t.json").read_text())
    assert out["images"] == 2 and out["steps"] == 1 and set(out["map50"]["ssd_vgg"]) == {"clean", "cls", "dag"}
    assert out["weights"]["ssd_vgg"] == str(w) and out["attack_settings"]["ssd_vgg"]["dag"]["steps"] == 1
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "A_cls" in md and "Table 1" in md and (tmp_path / "rep" / "index.html").is_file()
    assert "bootstrap intervals" in res.output and "bootstrap intervals" in md
    assert out["intervals"]["map50"]["ssd_vgg"]["clean"]["value"] == pytest.approx(out["map50"]["ssd_vgg"]["clean"])

    res = runner.invoke(app, base + ["--attacks", "cls", "--steps", "1,2", "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    sw = json.loads((tmp_path / "s.json").read_text())
    assert sw["kind"] == "steps_sweep" and sw["steps"] == [1, 2] and len(sw["map50"]["ssd_vgg"]["cls"]) == 2
    assert "2 steps" in res.output

    res = runner.invoke(app, ["bench", "robustness", "--models", "ssd_vgg,yolov3", "--weights", str(w),
                              "--data", str(toy_coco)])
    assert res.exit_code != 0 and "NAME=PATH" in res.output
    res = runner.invoke(app, ["bench", "robustness", "--models", "ssd_vgg", "--weights", str(w),
                              "--data", str(toy_coco)])
    assert res.exit_code == 2 and "predicts 8 classes" in res.output


def test_table_columns_build_the_documented_attacks():
    from advdet.attacks.dag import DAG
    from advdet.bench.robustness_columns import build_table_attack

    toy = ToyDetector()
    assert build_table_attack("clean", toy) is None
    dag = build_table_attack("dag-robustdet", toy)
    assert type(dag) is RobustDetDAG and dag.steps == 150 and dag.step == 0.5 and dag.eps is None
    assert not dag.accumulate
    # one name, one attack: `dag` is Xie's DAG here as everywhere; `dag-xie` is its old alias
    xie = build_table_attack("dag", toy, steps=3)
    assert type(xie) is DAG and xie.steps == 3
    assert type(build_table_attack("dag-xie", toy, steps=3)) is DAG
    cls = build_table_attack("cls", toy, eps=4)
    assert (cls.name, cls.eps, cls.step, cls.steps) == ("cls", 4.0, 4.0, 20)
    loc = build_table_attack("loc", toy, steps=5, overrides={"step": 1.0})
    assert (loc.eps, loc.step, loc.steps) == (8.0, 1.0, 5)


def test_robustdet_dag_keeps_two_stage_proposals_fixed():
    from advdet.models.torchvision_adapter import fasterrcnn_tiny

    torch.manual_seed(0)
    frcnn = fasterrcnn_tiny(num_classes=3, input_size=64).eval()
    x = torch.rand(1, 3, 64, 64)
    tg = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([2])}]
    atk = RobustDetDAG(frcnn, steps=2)
    x_adv = atk(x, tg)
    st = atk.last_state
    props = st["proposals"]
    assert props is not None and st["label"].shape == (1, props[0].shape[0])
    assert (st["label"] == 3).any() and set(st["label"].unique().tolist()) <= {0, 3}
    # the labels are those of SSD matching of the fixed clean proposals at IoU 0.5
    idx, pos = match_priors(tg[0]["boxes"], props[0], 0.5)
    assert torch.equal(st["label"][0], torch.where(pos, 3, 0))
    assert (x_adv - x).abs().max() <= 2 * 0.5 / 255 + 1e-6


def test_table_rows_deltas_against_the_first_model_by_hand():
    """Pure presentation: percent with one decimal, arrows against the first model, '=' for no change,
    missing cells (None, COCO's -1) stay empty and get no delta."""
    res = {"models": ["ssd", "rd"], "attacks": ["clean", "cls", "loc"],
           "map50": {"ssd": {"clean": 0.7712, "cls": 0.2049, "loc": -1},
                     "rd": {"clean": 0.7612, "cls": 0.3551, "loc": 0.5}}}
    cols, rows = table_rows(res)
    assert cols == ["Method", "Clean", "A_cls", "A_loc"]
    assert rows == [["ssd", "77.1", "20.5", None], ["rd", "76.1 ↓1.0", "35.5 ↑15.0", "50.0"]]
    res["map50"]["rd"]["clean"] = 0.7714  # rounds to the same percent: "="
    assert table_rows(res)[1][1][1] == "77.1 =0.0"
    assert table_rows(res, deltas=False)[1][1] == ["rd", "77.1", "35.5", "50.0"]
