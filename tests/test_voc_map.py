"""Pascal VOC mAP: hand-computed cases, 11-point vs all-point, difficult objects, reference voc_eval."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from advdet.metrics import voc_ap, voc_map


def _img(boxes, labels, difficult=None):
    d = {"boxes": np.asarray(boxes, float).reshape(-1, 4), "labels": np.asarray(labels, int)}
    if difficult is not None:
        d["difficult"] = np.asarray(difficult, bool)
    return d


def _det(boxes, scores, labels):
    return {"boxes": np.asarray(boxes, float).reshape(-1, 4), "scores": np.asarray(scores, float),
            "labels": np.asarray(labels, int)}


def hand_case():
    """Three classes. Class 0 exercises TP, duplicate, difficult and plain FP; class 1 has GT but only
    a wrong-image detection; class 2 has detections but no GT."""
    gt = [
        _img([[0, 0, 9, 9], [20, 20, 29, 29], [30, 30, 39, 39]], [0, 0, 1], [False, True, False]),  # A
        _img([[0, 0, 9, 9], [50, 50, 59, 59]], [0, 0]),  # B (no 'difficult' key: all False)
    ]
    dets = [
        _det([[0, 0, 9, 9],  # d1 0.9: TP, claims A's first GT
              [0, 0, 9, 9],  # d2 0.8: duplicate of the claimed GT -> FP
              [20, 20, 29, 29],  # d3 0.7: matches a difficult GT -> ignored
              [0, 0, 5, 5]],  # class 2, no GT anywhere -> irrelevant
             [0.9, 0.8, 0.7, 0.99], [0, 0, 0, 2]),
        _det([[50, 50, 59, 59],  # d4 0.6: TP
              [100, 100, 109, 109],  # d5 0.5: no overlap -> FP
              [0, 0, 9, 9],  # d6 0.4: TP
              [30, 30, 39, 39]],  # class 1 in image B where class 1 has no GT -> FP
             [0.6, 0.5, 0.4, 0.3], [0, 0, 0, 1]),
    ]
    return gt, dets


def test_hand_computed_voc07_and_all_point():
    gt, dets = hand_case()
    # Class 0, npos = 3 (the difficult GT does not count).
    # ranked:     d1  d2  d3(ignored)  d4  d5  d6
    # cum TP:      1   1   1            2   2   3
    # cum FP:      0   1   1            1   2   2
    # recall:    1/3 1/3 1/3          2/3 2/3   1
    # precision:   1 1/2 1/2          2/3 1/2 3/5
    # 11-point: t in {0, .1, .2, .3}: max prec over recall >= t = 1        (4 points)
    #           t in {.4, .5, .6}:    max(2/3, 1/2, 3/5) = 2/3           (3 points)
    #           t in {.7, .8, .9, 1}: 3/5                                (4 points)
    # AP07 = (4 * 1 + 3 * 2/3 + 4 * 3/5) / 11 = 8.4 / 11 = 0.763636...
    ap07_c0 = 8.4 / 11
    # All-point: envelope 1 on (0, 1/3], 2/3 on (1/3, 2/3], 3/5 on (2/3, 1]
    # AP = 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/5 = 2.2666... / 3 = 0.755555...
    ap_all_c0 = (1 + 2 / 3 + 3 / 5) / 3
    # Class 1: npos = 1, its only detection is a FP -> recall 0 everywhere -> AP 0.
    # Class 2: no GT -> NaN, excluded. mAP = (AP_0 + 0) / 2.
    res = voc_map(gt, dets, num_classes=3)
    assert res["num_gt"] == [3, 1, 0]
    assert res["ap_per_class"][0] == pytest.approx(ap07_c0, abs=1e-12)
    assert res["ap_per_class"][1] == 0.0
    assert math.isnan(res["ap_per_class"][2])
    assert res["map"] == pytest.approx(ap07_c0 / 2, abs=1e-12)
    res_all = voc_map(gt, dets, num_classes=3, use_07_metric=False)
    assert res_all["ap_per_class"][0] == pytest.approx(ap_all_c0, abs=1e-12)
    assert res_all["map"] == pytest.approx(ap_all_c0 / 2, abs=1e-12)


def test_voc_ap_11_point_vs_all_point_differ():
    rec, prec = np.array([0.5, 1.0]), np.array([1.0, 0.5])
    # 11-point: t in {0, .1, .2, .3, .4, .5} -> 1 (6 points), t in {.6, ..., 1} -> 0.5 (5 points)
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx((6 + 5 * 0.5) / 11, abs=1e-12)
    # all-point: 0.5 * 1 + 0.5 * 0.5
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(0.75, abs=1e-12)
    # envelope: a later higher precision lifts earlier recall levels
    assert voc_ap([0.25, 0.5], [0.5, 1.0], use_07_metric=False) == pytest.approx(0.5, abs=1e-12)
    # empty ranking -> 0
    assert voc_ap([], [], use_07_metric=True) == 0.0
    assert voc_ap([], [], use_07_metric=False) == 0.0


def test_voc_ap_keeps_voc_eval_threshold_quirk():
    # np.arange(0, 1.1, 0.1)[3] == 0.30000000000000004 > 0.3, so recall 3/10 reaches only the
    # thresholds 0, .1, .2: AP = 3/11 (not 4/11), as the published VOC07 code computes it.
    assert voc_ap([3 / 10], [1.0], use_07_metric=True) == pytest.approx(3 / 11, abs=1e-12)
    assert voc_ap([0.31], [1.0], use_07_metric=True) == pytest.approx(4 / 11, abs=1e-12)


def test_difficult_handling():
    gt = [_img([[0, 0, 9, 9], [20, 20, 29, 29]], [0, 0], [True, False])]
    # The detection on the difficult GT is ignored, even with the highest score: AP stays 1.
    dets = [_det([[0, 0, 9, 9], [20, 20, 29, 29]], [0.9, 0.5], [0, 0])]
    assert voc_map(gt, dets, 1)["map"] == pytest.approx(1.0)
    # Without the difficult flag the same detections give recall 1/2 at precision 1, then 1 at 1.
    gt_nd = [_img([[0, 0, 9, 9], [20, 20, 29, 29]], [0, 0], [False, False])]
    assert voc_map(gt_nd, dets, 1)["num_gt"] == [2]
    assert voc_map(gt_nd, dets, 1)["map"] == pytest.approx(1.0)
    # Missing the non-difficult GT: recall 0 -> AP 0 (the difficult match is neither TP nor FP).
    dets_miss = [_det([[0, 0, 9, 9]], [0.9], [0])]
    assert voc_map(gt, dets_miss, 1)["map"] == 0.0
    # A class whose only GT is difficult has npos 0: excluded (NaN), mAP over the others.
    gt2 = [_img([[0, 0, 9, 9], [40, 40, 49, 49]], [0, 1], [True, False])]
    dets2 = [_det([[40, 40, 49, 49]], [0.9], [1])]
    res = voc_map(gt2, dets2, 2)
    assert res["num_gt"] == [0, 1] and math.isnan(res["ap_per_class"][0])
    assert res["map"] == pytest.approx(1.0)


def test_pixel_offset_convention():
    gt = [_img([[0, 0, 10, 10]], [0])]
    dets = [_det([[0, 0, 10, 5]], [0.9], [0])]
    # VOC (+1): areas 11*11 = 121 and 11*6 = 66, intersection 66 -> IoU 0.545 > 0.5 -> TP.
    assert voc_map(gt, dets, 1)["map"] == pytest.approx(1.0)
    # continuous: 100 and 50, intersection 50 -> IoU exactly 0.5, not > 0.5 -> FP.
    assert voc_map(gt, dets, 1, pixel_offset=0.0)["map"] == 0.0
    assert voc_map(gt, dets, 1, iou_threshold=0.4, pixel_offset=0.0)["map"] == pytest.approx(1.0)


def test_torch_inputs_and_no_gt_at_all():
    gt = [{"boxes": torch.tensor([[0.0, 0, 9, 9]]), "labels": torch.tensor([1]),
           "difficult": torch.tensor([False])}]
    dets = [{"boxes": torch.tensor([[0.0, 0, 9, 9]]), "scores": torch.tensor([0.5]), "labels": torch.tensor([1])}]
    res = voc_map(gt, dets, 2)
    assert res["ap_per_class"][1] == pytest.approx(1.0) and res["map"] == pytest.approx(1.0)
    empty = voc_map([_img(np.zeros((0, 4)), [])], [_det(np.zeros((0, 4)), [], [])], 3)
    assert math.isnan(empty["map"]) and empty["num_gt"] == [0, 0, 0]


def test_bad_inputs():
    with pytest.raises(ValueError, match="label outside"):
        voc_map([_img([[0, 0, 1, 1]], [3])], [_det(np.zeros((0, 4)), [], [])], 3)
    with pytest.raises(ValueError, match="2 images"):
        voc_map([_img([[0, 0, 1, 1]], [0])] * 2, [_det(np.zeros((0, 4)), [], [])], 1)
    with pytest.raises(ValueError, match="differ in length"):
        voc_map([_img([[0, 0, 1, 1]], [0])], [_det([[0, 0, 1, 1]], [0.5, 0.4], [0])], 1)


# --- reference: py-faster-rcnn lib/datasets/voc_eval.py, the per-detection loop, verbatim logic ---
def _reference_voc_eval(gt, dets, c, ovthresh=0.5, use_07_metric=True):
    npos = 0
    class_recs = []
    for g in gt:
        m = g["labels"] == c
        diff = g["difficult"][m]
        class_recs.append({"bbox": g["boxes"][m], "difficult": diff, "det": [False] * int(m.sum())})
        npos += int((~diff).sum())
    image_ids, confidence, bb_list = [], [], []
    for i, d in enumerate(dets):
        for b, s, lab in zip(d["boxes"], d["scores"], d["labels"]):
            if lab == c:
                image_ids.append(i)
                confidence.append(s)
                bb_list.append(b)
    confidence = np.array(confidence)
    BB = np.array(bb_list).reshape(-1, 4)
    sorted_ind = np.argsort(-confidence, kind="stable")
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]
    nd = len(image_ids)
    tp, fp = np.zeros(nd), np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
            ih = np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                   + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0) - inters)
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_ap(rec, prec, use_07_metric)


@pytest.mark.parametrize("use_07", [True, False])
def test_matches_reference_voc_eval_on_random_data(use_07):
    rng = np.random.default_rng(7)
    num_classes, gt, dets = 4, [], []
    for _ in range(40):
        n = rng.integers(0, 6)
        xy = rng.uniform(0, 200, (n, 2))
        wh = rng.uniform(8, 80, (n, 2))
        boxes = np.round(np.concatenate([xy, xy + wh], 1))
        labels = rng.integers(0, num_classes, n)
        gt.append({"boxes": boxes, "labels": labels, "difficult": rng.random(n) < 0.2})
        # detections: jittered copies (some duplicated), plus random boxes
        k = rng.integers(0, 2 * n + 1)
        src = rng.integers(0, max(n, 1), k)
        db = boxes[src] + rng.normal(0, 6, (k, 4)) if n else np.zeros((0, 4))
        dl = np.where(rng.random(len(db)) < 0.85, labels[src] if n else [], rng.integers(0, num_classes, len(db)))
        m = rng.integers(0, 4)
        rb = np.concatenate([rng.uniform(0, 200, (m, 2)), rng.uniform(0, 200, (m, 2)) + 40], 1)
        dets.append({"boxes": np.concatenate([db, rb]).reshape(-1, 4),
                     "scores": np.round(rng.random(len(db) + m), 2),  # rounded: ties occur
                     "labels": np.concatenate([dl, rng.integers(0, num_classes, m)]).astype(int)})
    res = voc_map(gt, dets, num_classes, use_07_metric=use_07)
    ref = [_reference_voc_eval(gt, dets, c, use_07_metric=use_07) for c in range(num_classes)]
    assert all(0.1 < r < 0.95 for r in ref), ref  # non-trivial
    assert res["ap_per_class"] == pytest.approx(ref, abs=1e-12)
    assert res["map"] == pytest.approx(np.mean(ref), abs=1e-12)
