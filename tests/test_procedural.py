"""The procedural pretraining set and the backbone entries that the zoo's detectors start from."""

import numpy as np
import pytest
import torch

from advdet.data.procedural import (MAX_FILL, MIN_FILL, ProceduralClassification, _chaos_game, _fill_rate,
                                    ifs_class, procedural_tensors, render_procedural_image)
from advdet.models.weights import CheckpointError, save_weights
from advdet.models.zoo import PRETRAIN_DATA, zoo_entry


def _spectrum_slope(img: np.ndarray) -> float:
    """Slope of log power vs log spatial frequency (radial average) of the grey image."""
    g = img.astype(np.float64).mean(2)
    g -= g.mean()
    p = np.abs(np.fft.fftshift(np.fft.fft2(g))) ** 2
    s = g.shape[0]
    yy, xx = np.indices(p.shape)
    r = np.hypot(yy - s // 2, xx - s // 2).astype(int)
    rad = np.bincount(r.ravel(), p.ravel()) / np.bincount(r.ravel())
    f = np.arange(2, s // 2)
    return float(np.polyfit(np.log(f), np.log(rad[f]), 1)[0])


def test_items_are_deterministic_per_seed_split_and_index():
    a, la = render_procedural_image(0, "train", 5, 16, 64)
    b, lb = render_procedural_image(0, "train", 5, 16, 64)
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
    assert la == lb == 5 and np.array_equal(a, b)
    # another index, split or seed gives another image
    assert not np.array_equal(a, render_procedural_image(0, "train", 21, 16, 64)[0])  # same class, new instance
    assert not np.array_equal(a, render_procedural_image(0, "val", 5, 16, 64)[0])
    assert not np.array_equal(a, render_procedural_image(1, "train", 5, 16, 64)[0])
    # the dataset is independent of access order
    ds = ProceduralClassification(num_classes=16, length=8, size=48)
    fwd = [ds[i][0] for i in range(8)]
    assert all(torch.equal(fwd[i], ds[i][0]) for i in reversed(range(8)))
    with pytest.raises(ValueError, match="split"):
        render_procedural_image(0, "test", 0, 16, 64)


def test_classes_are_distinct_contractive_ifs_with_a_bounded_fill_rate():
    k = 24
    systems = [ifs_class(0, c) for c in range(k)]
    assert len({maps.tobytes() for maps, _ in systems}) == k  # k distinct classes
    for maps, probs in systems:
        assert 2 <= len(maps) <= 4 and probs.shape == (len(maps),) and abs(probs.sum() - 1) < 1e-9
        assert max(np.linalg.norm(a[:, :2], 2) for a in maps) <= 0.85 + 1e-9  # contractive: an attractor exists
        pts = _chaos_game(maps, probs, np.random.default_rng(0))
        assert np.isfinite(pts).all() and MIN_FILL <= _fill_rate(pts) <= MAX_FILL
    assert np.array_equal(ifs_class(0, 3)[0], ifs_class(0, 3)[0]) and not np.array_equal(ifs_class(1, 3)[0],
                                                                                           ifs_class(0, 3)[0])


def test_a_class_keeps_its_hue_and_texture_across_images():
    from advdet.data.procedural import _class_texture, class_style

    styles = [class_style(0, c) for c in range(64)]
    assert len({round(st[0], 6) for st in styles}) == 64 and {st[1] for st in styles} == {0, 1, 2, 3}
    assert class_style(0, 5) == class_style(0, 5) != class_style(1, 5)
    rng = np.random.default_rng(0)
    for st in styles[:8]:
        fills = [_class_texture(rng, st, 16) for _ in range(6)]
        # the brightest pixel of every fill has the class's hue (+- 0.04, and +- 0.05 where the second
        # colour of a texture blends in)
        for f in fills:
            px = f.reshape(-1, 3)[f.reshape(-1, 3).sum(1).argmax()]
            mx, mn = px.max(), px.min()
            if mx - mn < 1e-3:
                continue
            r, g, b = px
            h = ((g - b) / (mx - mn) % 6 if mx == r else (b - r) / (mx - mn) + 2 if mx == g else
                 (r - g) / (mx - mn) + 4) / 6
            d = abs(h - st[0]) % 1.0
            assert min(d, 1 - d) < 0.09, (h, st[0])


def test_labels_are_balanced_and_cover_every_class():
    ds = ProceduralClassification(num_classes=10, length=40, size=32)
    assert len(ds) == 40 and ds.num_classes == 10
    labels = [int(ds[i][1]) for i in range(len(ds))]
    assert np.bincount(labels, minlength=10).tolist() == [4] * 10
    x, _ = ProceduralClassification(num_classes=10, length=1, size=32, as_float=True)[0]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and 0 <= float(x.min()) <= float(x.max()) <= 1


def test_pixel_statistics_look_like_natural_images():
    imgs = [render_procedural_image(0, "train", i, 64, 64)[0] for i in range(48)]
    x = np.stack(imgs).astype(np.float64) / 255.0
    # no colour cast, no saturated or flat images
    assert np.all((x.mean((0, 1, 2)) > 0.35) & (x.mean((0, 1, 2)) < 0.65))
    assert x.std((1, 2, 3)).min() > 0.05
    assert (x == 0).mean() < 0.1 and (x == 1).mean() < 0.1  # not mostly clipped
    # natural images have a power spectrum ~ 1/f^2 (slope -2 on log-log axes); white noise has 0
    slope = np.mean([_spectrum_slope(i) for i in imgs])
    assert -3.0 < slope < -1.6, slope


def test_tensor_split_is_cached_and_matches_the_items(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVDET_HOME", str(tmp_path))
    images, labels = procedural_tensors(4, 8, size=32, seed=0, split="val")
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8 and labels.tolist() == [0, 1, 2, 3] * 2
    assert torch.equal(images[6], ProceduralClassification(4, 8, 32, 0, "val")[6][0])
    assert len(list((tmp_path / "cache").glob("procedural-*.pt"))) == 1
    again, _ = procedural_tensors(4, 8, size=32, seed=0, split="val")
    assert torch.equal(again, images)
    # two rendering processes give the same bytes
    par, par_labels = procedural_tensors(4, 8, size=32, seed=0, split="val", cache=False, workers=2)
    assert torch.equal(par, images) and torch.equal(par_labels, labels)


@pytest.mark.parametrize("det, pre", [("fcos", "resnet_pre"), ("retinanet", "resnet_pre"),
                                      ("fasterrcnn", "resnet_pre"), ("ssd_vgg", "vgg_pre"),
                                      ("yolov3", "darknet_pre")])
def test_detectors_start_from_their_familys_pretrained_body(tmp_path, monkeypatch, det, pre):
    from advdet.models import zoo
    from advdet.training.zoo_train import load_backbone_init

    entry = zoo_entry(det)
    assert entry.backbone_init == pre and zoo_entry(pre).kind == "backbone"
    torch.manual_seed(0)
    backbone = zoo_entry(pre).builder()
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path)
    save_weights(backbone, tmp_path / f"{pre}.safetensors", {})
    model = entry.builder()
    keys = load_backbone_init(model, entry)
    own, src = model.state_dict(), backbone.state_dict()
    assert len(keys) > 20
    for prefix, src_prefix in entry.backbone_keys.items():
        mine = [k for k in own if k.startswith(prefix)]
        assert mine and all(k in keys for k in mine)
        assert all(torch.equal(own[k], src[src_prefix + k[len(prefix):]].to(own[k].dtype)) for k in mine)
    # the heads are not touched, and a body of another architecture is refused with the file named
    assert not any(k.startswith("fc.") for k in keys)
    other = "vgg_pre" if pre != "vgg_pre" else "resnet_pre"
    save_weights(zoo_entry(other).builder(), tmp_path / f"{pre}.safetensors", {})
    with pytest.raises(CheckpointError, match=f"{pre}.safetensors"):
        load_backbone_init(entry.builder(), entry)


def test_the_four_torchvision_families_share_one_pretrained_body():
    inits = {zoo_entry(n).backbone_init for n in ("fcos", "retinanet", "fasterrcnn", "maskrcnn")}
    assert inits == {"resnet_pre"}
    # the body is the exact module of the detectors: same keys and shapes
    body = zoo_entry("resnet_pre").builder().body.state_dict()
    det = {k[len("model.backbone.body."):]: v for k, v in zoo_entry("fasterrcnn").builder().state_dict().items()
           if k.startswith("model.backbone.body.")}
    assert {k: tuple(v.shape) for k, v in body.items()} == {k: tuple(v.shape) for k, v in det.items()}


def test_backbone_recipe_trains_resumes_and_writes_a_card(tmp_path, monkeypatch):
    from advdet.models.pretrained_backbone import resnet_tiny_pretrain
    from advdet.training.zoo_train import train_zoo_model

    monkeypatch.setenv("ADVDET_HOME", str(tmp_path / "home"))
    entry = zoo_entry("resnet_pre")
    monkeypatch.setattr(entry, "data", dict(PRETRAIN_DATA, num_classes=4, train_per_class=8, val_per_class=2, size=32))
    monkeypatch.setattr(entry, "builder", lambda: resnet_tiny_pretrain(num_classes=4, input_size=32))
    over = dict(epochs=2, batch_size=8, warmup_iters=1, log_every=1, checkpoint_every=1)
    # a wall-time budget of 0 minutes stops after one update (checkpointed); --resume runs to the end
    card = train_zoo_model("resnet_pre", out_dir=tmp_path / "w", run_dir=tmp_path / "r",
                           overrides=dict(over, max_minutes=0.0))
    assert not card["finished"] and card["iterations"] == 1
    card = train_zoo_model("resnet_pre", out_dir=tmp_path / "w", run_dir=tmp_path / "r", resume=True, overrides=over)
    assert card["finished"] and card["iterations"] == 8 and card["kind"] == "backbone"
    val = card["procedural_val"]
    assert val["images"] == 8 and 0 <= val["top1"] <= val["top5"] <= 1
    assert card["input_size"] == 32 and card["num_classes"] == 4 and (tmp_path / "w" / "resnet_pre.safetensors").is_file()


def test_the_classifier_is_resnet_pre_with_its_head(tmp_path, monkeypatch):
    from advdet.models import zoo
    from advdet.training.zoo_train import train_zoo_model

    monkeypatch.setenv("ADVDET_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path)
    pre = zoo_entry("resnet_pre")
    monkeypatch.setattr(pre, "data", dict(PRETRAIN_DATA, val_per_class=1, num_classes=4, size=32))
    torch.manual_seed(0)
    src = pre.builder()
    save_weights(src, tmp_path / "resnet_pre.safetensors", {"name": "resnet_pre"}, dtype=torch.float16)
    card = train_zoo_model("classifier", out_dir=tmp_path / "out")
    assert card["kind"] == "classifier" and card["backbone_init"] == "resnet_pre" and card["input_size"] == 256
    assert card["procedural_val"]["images"] == 4
    got = zoo.build_model("classifier", weights=tmp_path / "out" / "classifier.safetensors")
    want = src.half().float().state_dict()
    assert all(torch.equal(v, want[k]) for k, v in got.state_dict().items())
    assert got.input_size == 256 and got(torch.rand(1, 3, 256, 256)).shape == (1, PRETRAIN_DATA["num_classes"])


def test_vgg_pre_sees_64_px_and_starts_at_he_init():
    """vgg_pre pretrains its BN-free VGG trunk on the 96 px set resized to 64 px, from He init (a first run
    at PyTorch's default init and lr 2e-3 stayed at chance)."""
    import torch.nn.functional as F
    from advdet.models.pretrained_backbone import vgg_tiny_pretrain

    torch.manual_seed(0)
    net = vgg_tiny_pretrain(num_classes=4, input_size=96).eval()
    x = torch.rand(2, 3, 96, 96)
    small = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        feats, feats64 = net.features(x), net.features(small)
    assert feats.shape == (2, 256, 4, 4)  # 64 px through the trunk (stride 16); 96 px would give 6 x 6
    torch.testing.assert_close(feats, feats64)
    convs = [m for m in net.body.vgg if isinstance(m, torch.nn.Conv2d)]
    for c in convs:  # kaiming normal, fan_out: std sqrt(2 / (out_channels * k * k))
        fan_out = c.out_channels * c.kernel_size[0] * c.kernel_size[1]
        assert abs(float(c.weight.detach().std()) / (2 / fan_out) ** 0.5 - 1) < 0.15
        assert float(c.bias.detach().abs().max()) == 0.0
    assert zoo_entry("vgg_pre").recipe["lr"] == 1e-3 and zoo_entry("vgg_pre").recipe["epochs"] == 16
