"""YOLOv3: Detector contract, decoding, target assignment, loss, Darknet weights I/O (tiny models)."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from torch import nn

from advdet.models.darknet_weights import (
    DarknetWeightsError,
    darknet_float_count,
    load_darknet_weights,
    save_darknet_weights,
)
from advdet.models.detector import NMSConfig, postprocess_dense
from advdet.models.yolov3 import YOLOv3Detector, yolov3, yolov3_small
from advdet.models.yolov3_net import YOLOv3Net

S = 64
K = 3


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convs: one intra-op thread is faster, and immune to OpenMP stalls on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(seed: int = 0, nms: NMSConfig | None = None) -> YOLOv3Detector:
    torch.manual_seed(seed)
    kw = {"nms": nms} if nms is not None else {}
    return yolov3(num_classes=K, input_size=S, width=0.125, depth=0.1, **kw)


def rectangles(n: int, seed: int = 0) -> tuple[torch.Tensor, list[dict]]:
    """n images of S x S with 1-2 coloured rectangles each; class = colour (red, green, blue)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 3, S, S), 0.5)
    targets = []
    for i in range(n):
        boxes, labels = [], []
        for _ in range(1 + i % 2):
            w, h = (torch.randint(12, 30, (2,), generator=g)).tolist()
            x0 = torch.randint(0, S - w, (1,), generator=g).item()
            y0 = torch.randint(0, S - h, (1,), generator=g).item()
            c = torch.randint(0, K, (1,), generator=g).item()
            x[i, :, y0:y0 + h, x0:x0 + w] = 0.0
            x[i, c, y0:y0 + h, x0:x0 + w] = 1.0
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(c)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return x, targets


# ------------------------------------------------------------------ contract
def test_predict_equals_postprocess_of_dense():
    det = tiny(nms=NMSConfig(score_thresh=0.001, nms_thresh=0.45, pre_nms_topk=1000, max_detections=100)).eval()
    x, _ = rectangles(2)
    pred = det.predict(x)
    ref = postprocess_dense(det.dense(x), det.nms, S)
    assert any(len(p["boxes"]) for p in pred)
    for p, r in zip(pred, ref):
        assert p["labels"].dtype == torch.int64
        torch.testing.assert_close(p["boxes"], r["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(p["scores"], r["scores"], atol=1e-4, rtol=0)
        assert torch.equal(p["labels"], r["labels"])
    # score = sigmoid(obj) * sigmoid(cls): the best detection is the best (candidate, class) pair
    d = det.dense(x)
    best = (d.objectness.sigmoid()[..., None] * d.logits.sigmoid()).flatten(1).amax(1)
    for b in range(2):
        assert pred[b]["scores"].max().item() == pytest.approx(best[b].item(), abs=1e-6)


def test_dense_layout():
    # (gradients to pixels, batch == single images: tests/test_detector_contract.py)
    det = tiny().eval()
    x, _ = rectangles(2)
    with torch.no_grad():
        d = det.dense(x)
    n = 3 * ((S // 32) ** 2 + (S // 16) ** 2 + (S // 8) ** 2)
    assert d.logits.shape == (2, n, K) and d.objectness.shape == (2, n)
    assert d.boxes.shape == (2, n, 4) and d.anchors.shape == (2, n, 4)
    assert d.score_mode == "sigmoid" and d.num_classes == K and det.family == "yolov3"
    assert d.extra["raw"].shape == (2, n, 5 + K)
    assert torch.equal(d.box_deltas, d.extra["raw"][..., :4])  # tx, ty, tw, th


# ------------------------------------------------------------------ decoding and assignment
ANCHORS = [(4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (28, 28), (40, 40), (56, 56)]


class FakeNet(nn.Module):
    """Returns learnable raw maps (strides 32, 16, 8 at 64 px), to test decoding and the loss alone."""

    def __init__(self):
        super().__init__()
        self.num_classes, self.num_anchors = K, 3
        c = 3 * (5 + K)
        self.maps = nn.ParameterList([nn.Parameter(torch.zeros(1, c, S // s, S // s)) for s in (32, 16, 8)])

    def forward(self, x):
        return [m.expand(x.shape[0], -1, -1, -1) for m in self.maps]


def test_decode_layout():
    net = FakeNet()
    det = YOLOv3Detector(net, K, S, anchors=ANCHORS)
    with torch.no_grad():  # stride 16, cell (gx=2, gy=1), slot 1 (anchor 16 x 16)
        net.maps[1][0, 1 * (5 + K): 1 * (5 + K) + 4, 1, 2] = torch.tensor([0.3, -0.2, 0.5, -0.4])
    d = det.dense(torch.zeros(1, 3, S, S))
    i = 3 * 2 * 2 + (1 * 4 + 2) * 3 + 1  # after the 2x2x3 stride-32 candidates; (row, col, anchor) order
    s = torch.sigmoid
    cx, cy = (s(torch.tensor(0.3)) + 2) * 16, (s(torch.tensor(-0.2)) + 1) * 16
    w, h = 16 * math.exp(0.5), 16 * math.exp(-0.4)
    torch.testing.assert_close(d.boxes[0, i], torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
    torch.testing.assert_close(d.anchors[0, i], torch.tensor([40.0 - 8, 24 - 8, 40 + 8, 24 + 8]))
    assert d.extra["num_per_level"] == [12, 48, 192] and d.extra["strides"] == [32.0, 16.0, 8.0]


def test_assignment_and_loss_terms():
    net = FakeNet()
    det = YOLOv3Detector(net, K, S, anchors=ANCHORS)
    # 16 x 16 box centred at (40, 24): anchor 4 (16 x 16) -> stride 16, slot 1, cell (2, 1), tx = 0.5, tw = 0
    tgt = [{"boxes": torch.tensor([[32.0, 16.0, 48.0, 32.0]]), "labels": torch.tensor([2])}]
    losses = det.loss(torch.zeros(1, 3, S, S), tgt)
    assert set(losses) == {"loc", "obj", "cls"}
    scale = 2 - 16 * 16 / S ** 2
    assert losses["loc"].item() == pytest.approx(scale * 2 * math.log(2), rel=1e-5)  # xy BCE at p = 0.5
    assert losses["cls"].item() == pytest.approx(K * math.log(2), rel=1e-5)
    g_cls = torch.autograd.grad(losses["cls"], list(net.maps), retain_graph=True)
    nz = [torch.nonzero(g[0]).tolist() for g in g_cls]
    assert nz[0] == [] and nz[2] == []
    assert nz[1] == [[1 * (5 + K) + 5 + c, 1, 2] for c in range(K)]
    # loc is at its optimum w.r.t. tx, ty, tw, th: zero gradient
    g_loc = torch.autograd.grad(losses["loc"], list(net.maps), retain_graph=True)
    assert all(g.abs().max() < 1e-6 for g in g_loc)
    # objectness: positive pushed up; other anchors of that cell overlap the box with IoU > 0.5: ignored
    g_obj = torch.autograd.grad(losses["obj"], list(net.maps))[1][0]
    obj_ch = [a * (5 + K) + 4 for a in range(3)]
    assert g_obj[obj_ch[1], 1, 2] < 0
    assert g_obj[obj_ch[0], 1, 2] == 0 and g_obj[obj_ch[2], 1, 2] == 0  # IoU 0.56 and 0.64: ignored
    assert g_obj[obj_ch[0], 3, 3] > 0  # a far candidate is a negative


def test_loss_zero_gt_and_bad_targets():
    det = tiny().train()
    x, t = rectangles(3)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    for targets in ([empty] * 3, [t[0], empty, t[2]]):
        losses = det.loss(x, targets)
        total = sum(losses.values())
        assert all(torch.isfinite(v) for v in losses.values())
        total.backward()
    assert det.loss(x, [empty] * 3)["cls"].item() == 0.0
    with pytest.raises(ValueError, match="labels"):
        det.loss(x, [{"boxes": t[0]["boxes"], "labels": t[0]["labels"] + 5}, empty, empty])
    with pytest.raises(ValueError, match="width"):
        det.loss(x, [{"boxes": torch.tensor([[5.0, 5, 5, 9]]), "labels": torch.tensor([0])}, empty, empty])
    with pytest.raises(ValueError, match="targets"):
        det.loss(x, [empty])


def test_loss_decreases_with_adam():
    det = tiny(seed=2).train()
    x, t = rectangles(4, seed=5)
    opt = torch.optim.Adam(det.parameters(), lr=3e-3)
    hist = []
    for _ in range(12):
        losses = det.loss(x, t)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        hist.append(total.item())
    assert all(math.isfinite(v) for v in hist)
    assert hist[-1] < 0.7 * hist[0], hist


# ------------------------------------------------------------------ Darknet weights
def test_darknet_round_trip_and_errors(tmp_path):
    a = tiny(seed=0)
    with torch.no_grad():  # non-trivial BN statistics
        for _, bn in a.model.darknet_convs():
            if bn is not None:
                bn.running_mean.uniform_(-0.1, 0.1)
                bn.running_var.uniform_(0.5, 1.5)
    a.eval()
    path = tmp_path / "tiny.weights"
    save_darknet_weights(a, path, seen=1234)
    assert path.stat().st_size == 20 + 4 * darknet_float_count(a)
    b = tiny(seed=7).eval()
    x, _ = rectangles(2)
    assert not torch.allclose(a.dense(x).logits, b.dense(x).logits)
    header = load_darknet_weights(b, path)
    assert (header.major, header.minor, header.seen) == (0, 2, 1234)
    da, db = a.dense(x), b.dense(x)
    assert torch.equal(da.logits, db.logits) and torch.equal(da.boxes, db.boxes)

    data = path.read_bytes()
    n = darknet_float_count(a)
    bad = tmp_path / "truncated.weights"
    bad.write_bytes(data[:-40])
    with pytest.raises(ValueError, match=rf"truncated\.weights.*expected {n} floats.*found {n - 10}"):
        load_darknet_weights(b, bad)
    bad.write_bytes(data + b"\0" * 8)
    with pytest.raises(DarknetWeightsError, match=rf"too long.*expected {n}.*found {n + 2}"):
        load_darknet_weights(b, bad)
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match="truncated.weights.*empty"):
        load_darknet_weights(b, bad)
    with pytest.raises(FileNotFoundError, match="missing.weights"):
        load_darknet_weights(b, tmp_path / "missing.weights")
    with pytest.raises(ValueError, match="missing.weights"):
        load_darknet_weights(b, tmp_path / "missing.weights")
    # another class count does not fit
    other = yolov3(num_classes=K + 1, input_size=S, width=0.125, depth=0.1)
    with pytest.raises(ValueError, match="tiny.weights"):
        load_darknet_weights(other, path)
    # old header (minor < 2): 32-bit `seen`; backbone-only file with num_convs
    nbc = a.model.num_backbone_convs
    nb = darknet_float_count(a, num_convs=nbc)
    old = tmp_path / "old.weights"
    old.write_bytes(struct.pack("<3ii", 0, 1, 0, 99) + data[20:20 + 4 * nb])
    h = load_darknet_weights(b, old, num_convs=nbc)
    assert h.seen == 99 and h.minor == 1


# ------------------------------------------------------------------ full size
def test_full_yolov3_layout_and_size():
    with torch.device("meta"):
        net = YOLOv3Net(num_classes=80)
        outs = net(torch.empty(1, 3, 416, 416))
    assert [tuple(o.shape) for o in outs] == [(1, 255, 13, 13), (1, 255, 26, 26), (1, 255, 52, 52)]
    assert sum(o.shape[2] * o.shape[3] * 3 for o in outs) == 10647
    assert sum(p.numel() for p in net.parameters()) == 61_949_149
    convs = net.darknet_convs()
    assert net.num_backbone_convs == 52
    assert len(convs) == 75 and [i for i, (_, bn) in enumerate(convs) if bn is None] == [58, 66, 74]
    # yolov3.weights is 248,007,048 bytes: 20-byte header + 62,001,757 float32
    assert darknet_float_count(net) == 62_001_757
    assert darknet_float_count(net, num_convs=52) * 4 + 20 == 162_482_580  # darknet53.conv.74 on disk
    # cfg order spot checks: route convs and concatenations
    assert convs[59][0].in_channels == 512 and convs[59][0].out_channels == 256  # layer 84
    assert convs[60][0].in_channels == 768  # layer 87, after [route] -1, 61
    assert convs[68][0].in_channels == 384  # layer 99, after [route] -1, 36


def test_small_builder():
    det = yolov3_small(num_classes=5)
    assert det.input_size == 256 and det.num_classes == 5
    assert det.anchor_wh.shape == (9, 2)
    torch.testing.assert_close(det.anchor_wh[0], torch.tensor([10 * 256 / 416, 13 * 256 / 416]))
    with pytest.raises(ValueError):
        det.dense(torch.zeros(1, 3, 250, 250))


def test_darknet_name_builds_the_published_yolov3_and_reads_weights_files(tmp_path):
    from advdet.bench.loading import UntrainedModelError, load_model
    from advdet.models.zoo import build_model, is_external

    assert is_external("darknet:yolov3") and is_external("torchvision:ssd300_vgg16") and not is_external("yolov3")
    a = build_model("darknet:yolov3", num_classes=1, input_size=64)
    assert (a.num_classes, a.input_size, a.model.width) == (1, 64, 1.0)
    assert build_model("darknet:yolov3").input_size == 416 and build_model("darknet:yolov3").num_classes == 80
    path = tmp_path / "yolov3.weights"
    save_darknet_weights(a, path)
    b = build_model("darknet:yolov3", num_classes=1, input_size=64, weights=path)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a.dense(x).logits, b.dense(x).logits)
    with pytest.raises(KeyError, match="unknown Darknet model 'darknet:yolov9'"):
        build_model("darknet:yolov9")
    with pytest.raises(DarknetWeightsError, match="yolov3.weights"):  # 80-class model, 1-class file
        build_model("darknet:yolov3", weights=path)
    with pytest.raises(UntrainedModelError, match="darknet:yolov3 has no trained weights"):
        load_model("darknet:yolov3")
    loaded = load_model("darknet:yolov3", allow_untrained=True, input_size=64)
    assert (loaded.trained, loaded.input_size, loaded.kind, loaded.origin) == (False, 64, "detector", "untrained")
