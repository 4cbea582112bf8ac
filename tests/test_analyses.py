"""The section-3.2 analyses of RobustDet: gradient entanglement R (Fig. 4) against its formula on hand-made
and real layers, the loss-change protocol (Fig. 3) against an independent re-run, the confidence
distribution (Fig. 7c) with known detections, and the CLI writing PNG + JSON."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from advdet.bench.analyses import run_confidence, run_entanglement, run_loss_change
from advdet.bench.analyses_measures import (LOSS_CHANGE_PAIRS, conv_layers, detection_loss, entanglement_ratio,
                                            gradient_entanglement, histogram, loss_change, per_image_detection_loss,
                                            per_layer_entanglement)
from test_robustness_bench import TOY_OBJECTS, ToyDetector, write_toy_coco


@pytest.fixture(scope="module")
def toy_coco(tmp_path_factory):
    return write_toy_coco(tmp_path_factory.mktemp("toy_an") / "coco")


def _toy_batches(toy_coco):
    from advdet.bench.analyses import load_batches

    return load_batches(ToyDetector(), toy_coco, limit=4, batch_size=2)


def test_entanglement_ratio_formula_and_edge_cases():
    a, b = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.5, -1.0, 3.0])
    assert entanglement_ratio(a, b) == pytest.approx(float(a @ b) / float(b @ b))
    assert entanglement_ratio(b, b) == pytest.approx(1.0)
    assert entanglement_ratio(-b, b) == pytest.approx(-1.0)
    assert entanglement_ratio(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == 0.0
    assert np.isnan(entanglement_ratio(a, torch.zeros(3)))
    with pytest.raises(ValueError, match="differ in size"):
        entanglement_ratio(a, torch.zeros(2))


def test_per_layer_entanglement_on_a_two_layer_linear_model():
    """y = W2 (W1 a): dy/dW1 = W2^T a^T, dy/dW2 = (W1 a)^T, so R_1 = a.b/|b|^2 and
    R_2 = (W1 a).(W1 b)/|W1 b|^2 for the clean input a and the adversarial input b."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 1, bias=False))
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, 1.0, 2.0])
    layers = conv_layers(net, min_weight_dim=2)
    assert [n for n, _ in layers] == ["0", "1"]
    r = per_layer_entanglement(net(a).sum(), net(b).sum(), layers)
    w1 = net[0].weight.detach()
    assert r[0] == pytest.approx(float(a @ b) / float(b @ b), rel=1e-6)
    assert r[1] == pytest.approx(float((w1 @ a) @ (w1 @ b)) / float((w1 @ b) @ (w1 @ b)), rel=1e-6)
    assert conv_layers(net) == []  # default: convolutions only (>= 4-d weights)


def test_gradient_entanglement_on_ssd_equals_direct_autograd():
    from advdet.models.ssd_vgg import ssd_vgg_small

    torch.manual_seed(0)
    ssd = ssd_vgg_small(num_classes=3, input_size=64).eval()
    x = torch.rand(2, 3, 64, 64)
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    tg = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([2])},
          {"boxes": torch.tensor([[20.0, 4.0, 60.0, 30.0]]), "labels": torch.tensor([0])}]
    res = gradient_entanglement(ssd, x, tg, x_adv)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in ssd.modules())
    assert len(res["layers"]) == n_convs and res["layers"][0] == "vgg.0"
    assert len(res["r_per_image"]) == 2 and all(len(r) == n_convs for r in res["r_per_image"])
    # layer 0 (conv1_1, weight and bias), by hand
    w, bias = ssd.model.vgg[0].weight, ssd.model.vgg[0].bias

    def g(xx, t):
        gw, gb = torch.autograd.grad(detection_loss(ssd, xx, t), [w, bias])
        return torch.cat([gw.flatten(), gb.flatten()])

    g1 = [g(x[i:i + 1], [tg[i]]) for i in range(2)]
    g2 = [g(x_adv[i:i + 1], [tg[i]]) for i in range(2)]
    assert res["r_per_image"][1][0] == pytest.approx(float(g1[1] @ g2[1] / (g2[1] @ g2[1])), rel=1e-4)
    s1, s2 = g1[0] + g1[1], g2[0] + g2[1]
    assert res["r_dataset"][0] == pytest.approx(float(s1 @ s2 / (s2 @ s2)), rel=1e-4)
    assert res["num_params"][0] == w.numel() + bias.numel()
    assert all(p.grad is None for p in ssd.parameters())


def test_loss_change_matches_an_independent_probe_and_restores_the_model(toy_coco):
    from advdet.attacks.registry import build_attack

    toy = ToyDetector()
    with torch.no_grad():  # logits of +-1.5 instead of +-10: losses far from 0, so a step shows
        toy.model.weight.mul_(0.15)
        toy.model.bias.mul_(0.15)
    xs, tgs, _ = _toy_batches(toy_coco)
    atk = build_attack("cls", toy, eps=40, step=40, steps=1)
    advs = [atk(x, t) for x, t in zip(xs, tgs)]
    before = copy.deepcopy(toy.state_dict())
    out = loss_change(toy, xs, advs, tgs, lr=0.05, probe_steps=2)
    assert list(out) == list(LOSS_CHANGE_PAIRS) and all(len(v) == 4 for v in out.values())
    assert all(torch.equal(before[k], v) for k, v in toy.state_dict().items())
    # by hand: two SGD steps on batch 0's adversarial images, measured on batch 1's clean images
    ref = copy.deepcopy(toy)
    base = per_image_detection_loss(ref, xs[1], tgs[1]).detach()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        detection_loss(ref, advs[0], tgs[0]).backward()
        opt.step()
    expect = (per_image_detection_loss(ref, xs[1], tgs[1]) - base).tolist()
    assert out["adv->clean"][:2] == pytest.approx(expect, rel=1e-5, abs=1e-7)
    assert any(abs(v) > 1e-4 for v in expect)
    with pytest.raises(ValueError, match=">= 2 batches"):
        loss_change(toy, xs[:1], advs[:1], tgs[:1])


def test_histogram_counts_every_value():
    edges = np.linspace(-1, 1, 5)
    assert histogram([-1.0, -0.2, 0.0, 0.99, 1.0, 3.0], edges) == [1, 1, 1, 3]


def test_run_loss_change_writes_png_and_json(tmp_path, toy_coco):
    res = run_loss_change("toy", toy_coco, tmp_path / "lc", detector=ToyDetector(), limit=4, batch_size=2,
                          attack="cls", eps=40, steps=1, lr=0.05, bins=10)
    data = json.loads((tmp_path / "lc" / "loss_change.json").read_text())
    assert (tmp_path / "lc" / "loss_change.png").stat().st_size > 1000
    assert data["analysis"] == "loss_change" and data["images"] == 4 and data["lr"] == 0.05
    assert data["measured_ids"] == [3, 4, 1, 2] and len(data["bin_edges"]) == 11
    for p in LOSS_CHANGE_PAIRS:
        d = data["pairs"][p]
        assert sum(d["counts"]) == 4 and len(d["values"]) == 4
        assert d["mean"] == pytest.approx(float(np.mean(d["values"])))
    assert data["attack_settings"]["attack"] == "cls" and data["attack_settings"]["eps"] == 40
    assert res["pairs"]["clean->adv"]["values"] == data["pairs"]["clean->adv"]["values"]


def test_run_confidence_counts_known_detections(tmp_path, toy_coco):
    res = run_confidence("toy", toy_coco, tmp_path / "cf", detector=ToyDetector(), limit=4, batch_size=2,
                         attacks=["cls", "loc"], eps=100, steps=1, thresh=0.3)
    data = json.loads((tmp_path / "cf" / "confidence.json").read_text())
    assert (tmp_path / "cf" / "confidence.png").is_file() and data["thresh"] == 0.3
    n_obj = sum(len(o) for o in TOY_OBJECTS)
    c = data["conditions"]
    # every square is found with score ~1 on clean and A_loc images (A_loc cannot move the toy's boxes);
    # A_cls at eps 100 removes them all (red/green cell means move by 0.39: z = 10 - 40 * 0.39 < 0), and
    # background cells, where sign() of a numerically zero gradient may still move a channel by 0.39,
    # stay below 0.3 (z <= 20 * 0.39 - 10)
    assert c["clean"]["n"] == n_obj and c["clean"]["mean"] > 0.99 and c["loc"]["n"] == n_obj
    assert c["cls"]["n"] == 0 and c["cls"]["mean"] is None
    for d in c.values():
        assert sum(d["counts"]) == d["n"] == len(d["scores"]) and all(s >= 0.3 for s in d["scores"])
    assert res["conditions"]["clean"]["counts"][-1] == n_obj


def test_run_entanglement_on_robustdet_covers_the_dynamic_convolutions(tmp_path, toy_coco):
    from advdet.models.robustdet import robustdet_small

    torch.manual_seed(0)
    rd = robustdet_small(num_classes=2, input_size=64)
    res = run_entanglement("rdet", toy_coco, tmp_path / "en", detector=rd, limit=2, batch_size=2, attack="cls",
                           eps=8, steps=1)
    data = json.loads((tmp_path / "en" / "entanglement.json").read_text())
    assert (tmp_path / "en" / "entanglement.png").is_file()
    assert data["images"] == 2 and len(data["r_per_image"]) == 2 and "vgg.0" in data["layers"]
    names = [n for n, _ in conv_layers(rd)]
    assert len(data["layers"]) == len(names) and any(n.startswith("model.aid") for n in names)
    assert all(v is None or np.isfinite(v) for v in data["r_dataset"])
    assert res["definition"].startswith("R_l = g1.g2/|g2|^2")


def test_cli_analyses(tmp_path):
    from advdet.cli import app
    from advdet.models.ssd_vgg import ssd_vgg_small
    from advdet.models.weights import save_weights

    data = write_toy_coco(tmp_path / "toy8", num_categories=8)
    torch.manual_seed(0)
    w = tmp_path / "w.safetensors"
    save_weights(ssd_vgg_small(num_classes=8, input_size=256), w, {})
    runner = CliRunner()
    common = ["--model", "ssd_vgg", "--weights", str(w), "--data", str(data), "--limit", "2", "--batch-size", "1",
              "--steps", "1", "--out", str(tmp_path / "out")]
    res = runner.invoke(app, ["analyze", "loss-change", *common, "--attack", "cls"])
    assert res.exit_code == 0, res.output
    assert "clean → adv" in res.output
    res = runner.invoke(app, ["analyze", "confidence", *common, "--attacks", "cls,loc"])
    assert res.exit_code == 0, res.output
    assert "A_cls" in res.output
    for name in ("loss_change", "confidence"):
        assert (tmp_path / "out" / f"{name}.png").is_file()
        assert json.loads((tmp_path / "out" / f"{name}.json").read_text())["analysis"] == name
    res = runner.invoke(app, ["analyze", "entanglement", "--model", "ssd_vgg", "--data", str(data), "--out",
                              str(tmp_path / "x"), "--attack", "nope", "--weights", str(w)])
    assert res.exit_code == 2 and "unknown attack" in res.output
