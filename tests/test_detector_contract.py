"""The Detector contract (DESIGN.md, models/), one suite for every registered builder.

Parametrised over the zoo's detector entries (the families behind optional extras appear when their
extra is installed, as the zoo registers them only then) and the tiny / torchvision builders the zoo does
not use. Each model is built once, untrained (random init with a fixed seed), in eval mode.

A new family is one file that declares its capabilities plus one line in :data:`CAPABILITIES` here.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from advdet.models.detector import DenseOutput, Detector, ProposalSettings

K = 3


@dataclass(frozen=True)
class Caps:
    """What a family declares (the expected values of its capabilities)."""

    score_mode: str
    loss_is_batch_mean: bool = False
    two_stage: bool = False
    objectness_nodes: bool = False
    objectness: bool = False  # dense().objectness is present
    box_deltas: int | None = 3  # ndim of dense().box_deltas (None: the family has none)
    prior_losses: bool = False  # positive_prior_losses / match_targets implemented
    passthrough: tuple[str, ...] = ()  # names of relevance_passthrough types
    losses: tuple[str, ...] = ("cls", "loc")  # loss names beyond the contract's cls and loc


#: one line per family: its declared capabilities
CAPABILITIES: dict[str, Caps] = {
    "ssd_vgg": Caps("softmax_bg", prior_losses=True, passthrough=("L2Norm",)),
    "robustdet": Caps("softmax_bg", prior_losses=True, passthrough=("L2Norm",)),
    "yolov3": Caps("sigmoid", loss_is_batch_mean=True, objectness_nodes=True, objectness=True,
                   losses=("cls", "loc", "obj")),
    "retinanet": Caps("sigmoid", loss_is_batch_mean=True),
    "fcos": Caps("sigmoid", objectness=True, losses=("cls", "loc", "ctrness")),
    "ssd": Caps("softmax_bg"),
    "faster_rcnn": Caps("softmax_bg", loss_is_batch_mean=True, two_stage=True, box_deltas=4,
                        losses=("cls", "loc", "rpn_obj", "rpn_loc")),
    "mask_rcnn": Caps("softmax_bg", two_stage=True, box_deltas=4, losses=("cls", "loc", "rpn_obj", "rpn_loc", "mask")),
    "ultralytics": Caps("sigmoid", losses=("cls", "loc", "dfl")),
    "rtdetr": Caps("sigmoid", losses=("cls", "loc", "giou")),
}


def _zoo_cases() -> dict[str, Callable[[], Detector]]:
    """Every zoo detector entry, except those that only retrain another entry's architecture (the robust
    ``ssd_vgg-*`` models: same builder, same class as ``ssd_vgg``)."""
    from advdet.models.zoo import zoo_entries, zoo_entry

    out = {}
    for e in zoo_entries():
        if e.kind != "detector":
            continue
        if e.init is not None and zoo_entry(e.init).family == e.family:
            continue
        out[e.name] = e.builder
    return out


def _tiny_cases() -> dict[str, Callable[[], Detector]]:
    """Builders the zoo does not use: torchvision's SSD family (tiny and SSDlite) and RetinaNet's v2 head."""
    from advdet.models.torchvision_adapter import retinanet_tiny, ssd_tiny, torchvision_detector

    return {
        "torchvision:ssd_tiny": lambda: ssd_tiny(num_classes=K, input_size=96),
        "torchvision:ssdlite320_mobilenet_v3_large": lambda: torchvision_detector(
            "ssdlite320_mobilenet_v3_large", num_classes=K, input_size=96),
        "torchvision:retinanet_tiny(group_norm_head)": lambda: retinanet_tiny(num_classes=K, input_size=96,
                                                                             group_norm_head=True),
    }


CASES = {**_zoo_cases(), **_tiny_cases()}
_BUILT: dict[str, Detector] = {}


def model(name: str) -> Detector:
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = CASES[name]().eval()
    return _BUILT[name]


def caps(det: Detector) -> Caps:
    assert det.family in CAPABILITIES, (f"family {det.family!r} has no line in CAPABILITIES: declare what it "
                                        "is expected to offer")
    return CAPABILITIES[det.family]


def batch(det: Detector, n: int = 2, seed: int = 1) -> tuple[torch.Tensor, list[dict]]:
    """n images of S x S with one or two coloured boxes each, and their targets (masks for mask models)."""
    s = det.input_size
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, s, s, generator=g) * 0.3
    targets = []
    for i in range(n):
        boxes, labels = [], []
        for j in range(1 + i % 2):
            x0, y0 = int(s * (0.1 + 0.4 * j)), int(s * (0.15 + 0.05 * i))
            w, h = int(s * 0.35), int(s * 0.4)
            x[i, (i + j) % 3, y0:y0 + h, x0:x0 + w] = 0.9
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append((i + j) % K)
        t = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}
        if det.has_masks:
            m = torch.zeros(len(boxes), s, s, dtype=torch.uint8)
            for k, (a, b, c, d) in enumerate(boxes):
                m[k, b:d, a:c] = 1
            t["masks"] = m
        targets.append(t)
    return x, targets


def _loss(det: Detector, x: torch.Tensor, targets: list[dict], seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # two-stage losses sample anchors / ROIs at random
    return det.loss(x, targets)


def _stochastic_loss(det: Detector, x: torch.Tensor, targets: list[dict]) -> bool:
    with torch.no_grad():
        a, b = _loss(det, x, targets, 0), _loss(det, x, targets, 1)
    return any(not torch.equal(a[k], b[k]) for k in a)


pytestmark = pytest.mark.parametrize("name", list(CASES))


def test_input_contract(name):
    det = model(name)
    s = det.input_size
    assert isinstance(det, Detector) and isinstance(det.model, torch.nn.Module)
    assert det.num_classes > 0
    with pytest.raises((ValueError, TypeError)):
        det.dense(torch.rand(3, s, s))
    with pytest.raises((ValueError, TypeError)):
        det.dense(torch.rand(1, 1, s, s))


def test_dense_fields_and_shapes(name):
    det = model(name)
    c = caps(det)
    x, _ = batch(det)
    with torch.no_grad():
        d = det.dense(x)
    assert isinstance(d, DenseOutput)
    b, n, cols = d.logits.shape
    assert b == 2 and n > 0 and d.score_mode == c.score_mode
    assert cols == det.num_classes + (1 if d.score_mode == "softmax_bg" else 0) and d.num_classes == det.num_classes
    assert d.boxes.shape == (b, n, 4) and d.anchors.shape == (b, n, 4)
    assert d.valid.shape == (b, n) and d.valid.dtype == torch.bool and d.valid.any(1).all()
    assert (d.objectness is not None) == c.objectness
    if d.objectness is not None:
        assert d.objectness.shape == (b, n)
    for t in (d.logits, d.boxes, d.anchors):
        assert torch.isfinite(t[d.valid]).all()
    if c.box_deltas is None:
        assert d.box_deltas is None and d.candidate_box_deltas() is None
    else:
        assert d.box_deltas is not None and d.box_deltas.ndim == c.box_deltas
        assert d.box_deltas.shape[:2] == (b, n) and d.box_deltas.shape[-1] == 4
        if d.box_deltas.ndim == 4:
            assert d.box_deltas.shape[2] == cols
        assert d.candidate_box_deltas().shape == (b, n, 4)
    p = d.class_probs()
    assert p.shape == (b, n, det.num_classes) and (p >= 0).all() and (p <= 1).all()


def test_batch_equals_single_images(name):
    """Dense outputs of a batch equal those of each image alone (two-stage: with the batch's proposals
    fixed, so that near-tied proposals cannot reorder)."""
    det = model(name)
    x, _ = batch(det, n=3, seed=5)
    # oneDNN picks convolution kernels by batch size (batch 3 vs 1 may differ by ~1e-6): PyTorch's own kernels
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        whole = det.dense(x)
        for i in range(3):
            if det.two_stage:
                props = [whole.anchors[i][whole.valid[i]]]
                one = det.dense(x[i:i + 1], proposals=props)
            else:
                one = det.dense(x[i:i + 1])
            v = whole.valid[i]
            n = int(v.sum())
            torch.testing.assert_close(one.logits[0][:n], whole.logits[i][v], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(one.boxes[0][:n], whole.boxes[i][v], atol=1e-3, rtol=1e-4)
            if whole.objectness is not None:
                torch.testing.assert_close(one.objectness[0], whole.objectness[i], atol=1e-4, rtol=1e-4)


def test_predict_format(name):
    det = model(name)
    x, _ = batch(det)
    s = det.input_size
    out = det.predict(x)
    assert isinstance(out, list) and len(out) == 2
    for p in out:
        m = p["boxes"].shape[0]
        assert p["boxes"].shape == (m, 4) and p["boxes"].is_floating_point()
        assert p["scores"].shape == (m,) and p["labels"].shape == (m,) and p["labels"].dtype == torch.int64
        if m:
            assert p["labels"].min() >= 0 and p["labels"].max() < det.num_classes
            assert torch.isfinite(p["boxes"]).all() and (p["scores"] >= 0).all() and (p["scores"] <= 1).all()
        if det.has_masks:
            assert p["masks"].shape == (m, s, s)


def test_loss_names_and_per_image_loss(name):
    """``loss`` has the contract's names; ``per_image_loss`` is each image's loss as its own batch;
    ``total_loss`` is their sum, which for a family declaring ``loss_is_batch_mean`` is ``B * loss``."""
    det = model(name)
    c = caps(det)
    x, tg = batch(det)
    with torch.no_grad():
        losses = _loss(det, x, tg)
        assert {"cls", "loc"} <= set(losses) and set(c.losses) <= set(losses), sorted(losses)
        assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
        torch.manual_seed(0)
        per = det.per_image_loss(x, tg)
        torch.manual_seed(0)
        alone = [det.loss(x[i:i + 1], [tg[i]]) for i in range(2)]
        assert set(per) == set(losses)
        for k in per:
            assert per[k].shape == (2,)
            torch.testing.assert_close(per[k], torch.stack([a[k] for a in alone]), rtol=1e-4, atol=1e-6)
        torch.manual_seed(0)
        total = det.total_loss(x, tg)
        assert set(total) == set(losses)
        if not det.loss_is_batch_mean:
            for k in total:
                torch.testing.assert_close(total[k], per[k].sum(), rtol=1e-5, atol=1e-6)
        elif not _stochastic_loss(det, x, tg):  # sampled losses are a batch mean in expectation only
            for k in total:
                torch.testing.assert_close(total[k], per[k].sum(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        det.total_loss(x, tg[:1])


def test_gradients_reach_pixels(name):
    det = model(name)
    x, tg = batch(det)
    x.requires_grad_(True)
    d = det.dense(x)
    (g,) = torch.autograd.grad(d.logits[d.valid].sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    torch.manual_seed(0)
    total = det.total_loss(x, tg)
    (g,) = torch.autograd.grad(sum(total.values()), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_capability_values(name):
    det = model(name)
    c = caps(det)
    assert det.loss_is_batch_mean == c.loss_is_batch_mean
    assert det.two_stage == c.two_stage
    assert det.objectness_nodes == c.objectness_nodes
    assert tuple(t.__name__ for t in det.relevance_passthrough) == c.passthrough
    present = {type(m) for m in det.modules()}
    assert all(t in present for t in det.relevance_passthrough)  # declared types are modules it has
    x, tg = batch(det)
    with torch.no_grad():
        d = det.dense(x)
        matched = det.match_targets(tg)
        prior = det.positive_prior_losses(x, tg)
    assert (matched is not None) == c.prior_losses and (prior is not None) == c.prior_losses
    if matched is not None:
        assert matched.shape == d.valid.shape and matched.min() >= 0 and matched.max() <= det.num_classes
        per, cls_t = prior
        assert per.shape == cls_t.shape == d.valid.shape and torch.equal(cls_t, matched)
        assert (per[cls_t == 0] == 0).all() and (cls_t > 0).any()
    settings = det.proposal_settings()
    if not det.two_stage:
        assert settings is None
        with det.use_proposal_settings(nms_thresh=0.9, pre_nms_top_n=5, post_nms_top_n=5):
            pass
        return
    assert isinstance(settings, ProposalSettings)
    with ExitStack() as stack:
        stack.enter_context(det.use_proposal_settings(nms_thresh=0.5, post_nms_top_n=7))
        assert det.proposal_settings() == ProposalSettings(0.5, settings.pre_nms_top_n, 7)
        with torch.no_grad():
            assert (det.dense(x).valid.sum(1) <= 7).all()
    assert det.proposal_settings() == settings  # restored
    with torch.no_grad():  # the head evaluated on given proposals keeps them
        fixed = det.dense(x, proposals=[a[v] for a, v in zip(d.anchors, d.valid)])
    assert torch.equal(fixed.anchors, d.anchors) and torch.equal(fixed.valid, d.valid)
