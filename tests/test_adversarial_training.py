"""Adversarial training (SSD-AT, MTD, CWAT, RobustDet): steps, schedules, loss composition, resume, CLI, zoo."""

import json

import pytest
import torch
from typer.testing import CliRunner

from advdet.attacks.base import eval_mode
from advdet.attacks.losses import per_image_losses
from advdet.attacks.registry import build_attack
from advdet.models.robustdet import RobustSSD
from advdet.models.ssd_vgg import ssd_vgg_small
from advdet.models.weights import CheckpointError, save_weights
from advdet.training.methods import (METHODS, MethodConfig, build_step_fn, prepare_model, resolve_init,
                                     split_recipe)
from advdet.training.standard import TrainConfig, train_detector
from advdet.training.tensor_cache import TensorCache

S = 64
EPS = 8 / 255


def _batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, S, S, generator=g) * 0.25
    t = []
    for i in range(n):
        x0, w = 4 + 6 * i, 16 + 4 * (i % 4)
        x[i, :, 10:10 + w, x0:x0 + w] = 0.9
        t.append({"boxes": torch.tensor([[x0, 10.0, x0 + w, 10 + w]]), "labels": torch.tensor([i % 2])})
    return x, t


def _cache(n=8):
    x, t = _batch(n)
    return TensorCache((x * 255).round().to(torch.uint8), [d["boxes"] for d in t], [d["labels"] for d in t])


def _ssd(seed=0):
    torch.manual_seed(seed)
    return ssd_vgg_small(num_classes=2, input_size=S)


@pytest.mark.parametrize("method,schedule", [(m, "interleaved") for m in METHODS] + [("mtd", "plain"),
                                                                                       ("robustdet", "plain")])
def test_each_method_step_runs_with_finite_losses(method, schedule):
    mc = MethodConfig(schedule=schedule, pgd_steps=2)
    det = prepare_model(method, _ssd(), None, seed=0, cfg=mc)
    assert isinstance(det, RobustSSD) == METHODS[method].robustdet
    assert getattr(det, "has_cfr", False) == METHODS[method].cfr
    step = build_step_fn(method, mc)
    x, t = _batch(4)
    det.train()
    losses = step(det, x, t) if step is not None else det.loss(x, t)
    total = losses["loss"] if "loss" in losses else sum(losses.values())
    assert torch.isfinite(total) and total.requires_grad
    assert all(torch.isfinite(v).all() for v in losses.values())
    total.backward()
    grads = [p.grad for p in det.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert det.training  # the attack ran in eval mode and restored train mode
    if METHODS[method].robustdet:
        assert {"cls", "loc", "aid", "det"} <= set(losses) and ({"re", "kld"} <= set(losses)) == METHODS[method].cfr


def test_adversarial_half_is_perturbed_within_eps_and_trained_on():
    det = _ssd()
    step = build_step_fn("at-cls", MethodConfig(schedule="plain", pgd_steps=3))
    x, t = _batch(4)
    det.train()
    losses = step(det, x, t)
    x_adv, x0, ta = step.examples.last
    assert torch.equal(x0, x[2:]) and all(a is b for a, b in zip(ta, t[2:]))  # the second half is the adversarial source
    d = (x_adv - x0).abs()
    assert float(d.max()) <= EPS + 1e-6 and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert float((d > 0.5 / 255).float().mean()) > 0.5  # really perturbed, not a few pixels
    with eval_mode(det), torch.no_grad():  # A_cls raised the classification loss of every adversarial image
        assert (per_image_losses(det, x_adv, ta)["cls"] > per_image_losses(det, x0, ta)["cls"]).all()
    ref = det.loss(torch.cat([x[:2], x_adv]), t[:2] + ta)  # one forward of [clean half; adversarial half]
    assert torch.allclose(losses["loss"], ref["cls"] + ref["loc"], rtol=1e-5)
    assert torch.allclose(losses["cls"], ref["cls"]) and torch.allclose(losses["loc"], ref["loc"])


@pytest.fixture(scope="module")
def fitted_ssd():
    """A tiny SSD fitted a little to one batch, so that A_cls does not win on every image of it."""
    xs, ts = _batch(4, seed=1)
    det = _ssd(1)
    opt = torch.optim.Adam(det.parameters(), 1e-3)
    for _ in range(20):
        loss = sum(det.loss(xs, ts).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return det, xs, ts


@pytest.mark.parametrize("schedule", ["plain", "interleaved"])
def test_mtd_picks_per_image_the_larger_total_loss(schedule, fitted_ssd):
    det, xs, ts = fitted_ssd
    steps = 2 if schedule == "plain" else 1  # interleaved: check its first step (from the clean image)
    step = build_step_fn("mtd", MethodConfig(schedule=schedule, pgd_steps=2))
    xc, tc = _batch(4, seed=5)
    det.train()
    step(det, torch.cat([xc, xs]), tc + ts)
    x_mtd = step.examples.last[0]
    # by hand: the A_cls and A_loc examples, their total loss per image, the larger one per image
    x_cls = build_attack("cls", det, steps=steps)(xs, ts)
    x_loc = build_attack("loc", det, steps=steps)(xs, ts)
    with eval_mode(det), torch.no_grad():
        tot_cls = sum(per_image_losses(det, x_cls, ts).values())
        tot_loc = sum(per_image_losses(det, x_loc, ts).values())
    pick_cls = tot_cls >= tot_loc
    assert pick_cls.any() and not pick_cls.all(), "the hand-check needs images of both kinds"
    for i in range(4):
        want = x_cls[i] if pick_cls[i] else x_loc[i]
        other = x_loc[i] if pick_cls[i] else x_cls[i]
        assert torch.equal(x_mtd[i], want) and not torch.equal(x_mtd[i], other)


@pytest.mark.parametrize("method", ["robustdet", "robustdet-cfr"])
def test_robustdet_loss_composition(method):
    mc = MethodConfig(pgd_steps=2)
    det = prepare_model(method, _ssd(), None, seed=0, cfg=mc)
    step = build_step_fn(method, mc)
    x, t = _batch(4)
    det.train()
    out = step(det, x, t)
    assert torch.allclose(out["det"], out["cls"] + out["loc"])
    want = 0.75 * (out["det"] + 3 * out["aid"])
    if method == "robustdet-cfr":
        assert out["re"] > 0 and out["kld"] >= 0
        want = want + (0.16 * out["re"] + 5 * out["kld"]) / 255
    assert torch.allclose(out["loss"], want, rtol=1e-5), (float(out["loss"]), float(want))
    assert out["n_triplets"] >= 1 and 0 <= out["pi_gap"] <= 2


def test_interleaved_schedule_carries_the_adversarial_batch():
    """With fixed weights, the k-th update of a cycle trains on exactly the k-step PGD example of the batch
    drawn at the cycle start; the next cycle starts from the then-current source half."""
    det = _ssd()
    step = build_step_fn("at-cls", MethodConfig(schedule="interleaved", pgd_steps=3))
    batches = [_batch(4, seed=s) for s in range(4)]
    seen = []
    det.train()
    for x, t in batches:
        step(det, x, t)
        x_adv, x0, _ = step.examples.last
        seen.append((x_adv.clone(), x0.clone(), step.examples.t, step.examples.cycles))
    src0 = batches[0][0][2:]
    for k in range(3):  # updates 1..3 attack the first batch's source half
        x_adv, x0, t_done, cycles = seen[k]
        assert torch.equal(x0, src0) and t_done == k + 1 and cycles == 1
        ref = build_attack("cls", det, steps=k + 1)(src0, batches[0][1][2:])
        assert torch.equal(x_adv, ref)
        assert float((x_adv - x0).abs().max()) <= EPS + 1e-6
    assert not torch.equal(seen[0][0], seen[1][0])  # the example evolves step by step
    x_adv, x0, t_done, cycles = seen[3]  # update 4 starts a new cycle on batch 4's source half
    assert torch.equal(x0, batches[3][0][2:]) and t_done == 1 and cycles == 2
    # the carried state survives a state_dict round trip
    state = step.state_dict()
    other = build_step_fn("at-cls", MethodConfig(schedule="interleaved", pgd_steps=3))
    other.load_state_dict(state)
    assert other.examples.t == 1 and torch.equal(other.examples.x_adv, step.examples.x_adv)


def _train_cfg(**kw):
    base = dict(iters=3, batch_size=4, lr=1e-3, optimizer="sgd", lr_schedule="constant", warmup_iters=0,
                checkpoint_every=100, log_every=1, seed=3)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("method", ["mtd", "robustdet-cfr"])
def test_resume_is_bit_exact_for_adversarial_training(tmp_path, method):
    mc = MethodConfig(schedule="interleaved", pgd_steps=3)  # the split at 1 falls inside a PGD cycle

    def fresh():
        return prepare_model(method, _ssd(), None, seed=0, cfg=mc)

    a = fresh()
    full = train_detector(a, _cache(), _train_cfg(), tmp_path / "full", step_fn=build_step_fn(method, mc))
    assert full["finished"] and full["iterations"] == 3
    b = fresh()
    part = train_detector(b, _cache(), _train_cfg(), tmp_path / "part", step_fn=build_step_fn(method, mc),
                          stop_after=1)
    assert not part["finished"] and part["iterations"] == 1
    ck = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert ck["method_state_ranks"][0]["t"] == 1 and "x_adv" in ck["method_state_ranks"][0]
    c = fresh()  # a new process: fresh model and step, everything else from the checkpoint
    done = train_detector(c, _cache(), _train_cfg(), tmp_path / "part", step_fn=build_step_fn(method, mc),
                          resume=True)
    assert done["finished"] and done["iterations"] == 3
    for k, v in a.state_dict().items():
        assert torch.equal(v, c.state_dict()[k]), k
    assert not torch.equal(a.state_dict()["model.vgg.0.weight"], fresh().state_dict()["model.vgg.0.weight"])


def test_prepare_model_copies_the_ssd_into_every_kernel_slot(tmp_path):
    ssd = _ssd()
    save_weights(ssd, tmp_path / "ssd.safetensors", {})
    det = prepare_model("robustdet", _ssd(seed=5), tmp_path / "ssd.safetensors", seed=0)
    w = det.model.vgg[0].weight  # (K, out, in, k, k)
    assert w.shape[0] == 4 and all(torch.equal(w[k], ssd.model.vgg[0].weight) for k in range(4))
    x, _ = _batch(2)
    ssd.eval(), det.eval()
    assert torch.allclose(det.dense(x).logits, ssd.dense(x).logits, atol=1e-4)
    # a RobustSSD checkpoint loads as is; a zoo name without weights is a clear error
    save_weights(det, tmp_path / "rd.safetensors", {})
    again = prepare_model("robustdet", det, tmp_path / "rd.safetensors", seed=1)
    assert torch.equal(again.model.aid.backbone.fc.weight, det.model.aid.backbone.fc.weight)
    with pytest.raises(ValueError, match="CFR"):
        prepare_model("robustdet-cfr", det, None)
    with pytest.raises(CheckpointError, match="neither a weights file nor a zoo model"):
        resolve_init(tmp_path / "missing.safetensors")
    # RobustDet is built from an SSD-VGG only, and its step refuses a plain SSD
    from advdet.models.yolov3 import yolov3_small
    with pytest.raises(TypeError, match="builds RobustDet from an SSD-VGG; got YOLOv3Detector"):
        prepare_model("robustdet", yolov3_small(num_classes=2, input_size=S), None)
    x, t = _batch(2)
    with pytest.raises(TypeError, match="RobustDet training needs a RobustSSD .*got SSDVGG"):
        build_step_fn("robustdet", MethodConfig(pgd_steps=1))(_ssd(), x, t)


def test_robust_zoo_entries_recipes_and_missing_init(tmp_path, monkeypatch):
    import advdet.models.zoo as zoo
    from advdet.training.zoo_train import train_zoo_model

    names = ["ssd_vgg-at-cls", "ssd_vgg-at-loc", "ssd_vgg-mtd", "ssd_vgg-cwat", "robustdet", "robustdet-cfr"]
    for name in names:
        e = zoo.zoo_entry(name)
        assert e.init == "ssd_vgg" and e.method in METHODS and e.method != "standard"
        tcfg, mcfg = split_recipe(e.recipe)
        assert tcfg.batch_size % 2 == 0 and (tcfg.iters or tcfg.epochs) and mcfg.schedule == "interleaved"
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path)  # no shipped weights at all
    with pytest.raises(CheckpointError, match=r"ssd_vgg.safetensors.*missing.*advdet zoo train ssd_vgg"):
        train_zoo_model("robustdet", out_dir=tmp_path, run_dir=tmp_path / "run")
    with pytest.raises(KeyError, match="unknown recipe field"):
        split_recipe({"iters": 2, "pgd_step": 3})
    from advdet.cli import app

    res = CliRunner().invoke(app, ["zoo", "list", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert all(rows[n]["trained"] is False and rows[n]["file_size"] is None for n in names)  # "not trained"


def test_cli_train_end_to_end(tmp_path):
    """`advdet train --method robustdet` for 2 updates from an SSD checkpoint, with evaluation."""
    from advdet.cli import app
    from advdet.data.shapes import generate_shapes
    from advdet.models.zoo import build_model

    generate_shapes(tmp_path / "shp", train=4, val=2, seed=0, workers=1)
    torch.manual_seed(0)
    save_weights(build_model("ssd_vgg", pretrained=False), tmp_path / "ssd.safetensors", {})
    out = tmp_path / "run"
    args = ["train", "--method", "robustdet", "--model", "ssd_vgg", "--init", str(tmp_path / "ssd.safetensors"),
            "--data", str(tmp_path / "shp" / "train"), "--out", str(out), "--iters", "2", "--batch-size", "2",
            "--pgd-steps", "1", "--seed", "1", "--eval", "--eval-data", str(tmp_path / "shp" / "val")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "robustdet on ssd_vgg: 2/2 updates" in res.output
    card = json.loads((out / "weights.json").read_text())
    assert card["method"] == "robustdet" and card["init"].endswith("ssd.safetensors") and card["seed"] == 1
    assert card["recipe"]["iters"] == 2 and card["recipe"]["optimizer"] == "sgd"
    assert card["method_config"]["attack"] == "mtd" and card["method_config"]["steps"] == 1
    assert card["method_config"]["cfr_divisor"] == 255 and card["finished"] and card["train_images_per_second"] > 0
    assert card["command"].startswith("advdet train --method robustdet --model ssd_vgg --data ")
    assert "--iters 2 " in card["command"] and "--eval " in card["command"] and card["eval"]["images"] == 2
    det = build_model("robustdet", weights=out / "weights.safetensors")  # loads into the zoo architecture
    assert isinstance(det, RobustSSD) and (out / "checkpoint.pt").is_file()
    res = CliRunner().invoke(app, ["train", "--method", "nope", "--model", "ssd_vgg", "--out", str(out)])
    assert res.exit_code != 0 and "unknown training method" in res.output
