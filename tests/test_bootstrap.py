"""Bootstrap intervals of mAP50 (advdet.metrics.bootstrap, advdet.bench.intervals) against known answers:
identical images collapse the interval, mAP on a resample equals the evaluators on the explicitly duplicated
image list, a percentile bootstrap of a plain mean agrees with numpy on the same resamples, and identical
attacks differ by exactly 0 on every resample."""

from __future__ import annotations

import numpy as np
import pytest

from advdet.bench.intervals import (fmt_interval, grid_intervals, paired_baselines, transfer_interval_table,
                                    transfer_intervals, transfer_paired_table)
from advdet.metrics.bootstrap import (bootstrap_map, coco_image_matches, interval, paired_interval,
                                      percentile_interval, resample_indices, voc_image_matches)
from advdet.metrics.coco_map import coco_map
from advdet.metrics.voc_map import voc_map


# ------------------------------------------------------------------------------------------- fixtures
def random_coco(seed: int, n_images: int = 12, n_cats: int = 3, crowd: bool = True):
    """A COCO ground truth with 0-4 objects per image (some crowd) and noisy detections: most near an
    object (some with the wrong class, some duplicated), a few anywhere."""
    rng = np.random.default_rng(seed)
    images = [{"id": 10 * i + 7, "width": 100, "height": 100} for i in range(n_images)]
    anns, results = [], []
    for im in images:
        for _ in range(rng.integers(0, 5)):
            x, y = rng.uniform(0, 70, 2)
            w, h = rng.uniform(5, 30, 2)
            c = int(rng.integers(1, n_cats + 1))
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": c, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": int(crowd and rng.random() < 0.1)})
            for _ in range(rng.integers(0, 3)):
                j = rng.normal(0, 3, 4)
                cat = c if rng.random() < 0.8 else int(rng.integers(1, n_cats + 1))
                results.append({"image_id": im["id"], "category_id": cat, "score": float(rng.random()),
                                "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])]})
        for _ in range(rng.integers(0, 3)):
            results.append({"image_id": im["id"], "category_id": int(rng.integers(1, n_cats + 1)),
                            "score": float(rng.random()),
                            "bbox": [*rng.uniform(0, 60, 2).tolist(), *rng.uniform(5, 30, 2).tolist()]})
    cats = [{"id": k + 1, "name": f"c{k}"} for k in range(n_cats)]
    return {"images": images, "annotations": anns, "categories": cats}, results


def duplicated_coco(gt: dict, results: list, image_ids: list[int], picks) -> tuple[dict, list]:
    """The image list ``picks`` (positions into ``image_ids``, repeats allowed) as a new COCO dataset: every
    pick is a new image (new id) with copies of its annotations and detections."""
    images, anns, res = [], [], []
    for new_id, p in enumerate(picks, 1):
        old = image_ids[int(p)]
        images.append({"id": new_id, "width": 100, "height": 100})
        anns += [{**a, "id": len(anns) + 1 + k, "image_id": new_id}
                 for k, a in enumerate(a for a in gt["annotations"] if a["image_id"] == old)]
        res += [{**r, "image_id": new_id} for r in results if r["image_id"] == old]
    return {"images": images, "annotations": anns, "categories": gt["categories"]}, res


def random_voc(seed: int, n_images: int = 10, n_classes: int = 3):
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for _ in range(n_images):
        n = int(rng.integers(0, 5))
        xy = rng.uniform(0, 70, (n, 2))
        wh = rng.uniform(5, 30, (n, 2))
        boxes = np.concatenate([xy, xy + wh], 1)
        labels = rng.integers(0, n_classes, n)
        gts.append({"boxes": boxes, "labels": labels, "difficult": rng.random(n) < 0.15})
        keep = rng.random(n) < 0.8
        extra = int(rng.integers(0, 3))
        d_boxes = np.concatenate([boxes[keep] + rng.normal(0, 3, (int(keep.sum()), 4)),
                                  np.concatenate([rng.uniform(0, 60, (extra, 2))] * 2, 1)
                                  + np.array([0, 0, 20, 20])])
        d_labels = np.concatenate([labels[keep], rng.integers(0, n_classes, extra)])
        dets.append({"boxes": d_boxes, "labels": d_labels, "scores": rng.random(len(d_labels))})
    return gts, dets


def nan_or(x):
    return float("nan") if x is None or x < 0 else x


# ------------------------------------------------------------------------------------------- known answers
@pytest.mark.parametrize("seed", range(6))
def test_coco_point_and_resamples_equal_coco_map_on_duplicated_images(seed):
    gt, results = random_coco(seed)
    ids = [im["id"] for im in gt["images"]]
    matches = coco_image_matches(gt, results, ids)
    assert matches.map() == pytest.approx(coco_map(gt, results, "bbox", image_ids=ids)["map50"], abs=1e-12)
    picks = resample_indices(len(ids), 4, seed=seed)
    boot = bootstrap_map(matches, picks)
    for b, row in enumerate(picks):
        gt2, res2 = duplicated_coco(gt, results, ids, row)
        expected = nan_or(coco_map(gt2, res2, "bbox")["map50"])
        np.testing.assert_allclose(boot[b], expected, atol=1e-12)


def test_coco_matches_follow_image_ids_subset_and_max_dets():
    gt, results = random_coco(11, n_images=8)
    ids = [im["id"] for im in gt["images"]][2:7]
    assert coco_image_matches(gt, results, ids).map() == pytest.approx(
        coco_map(gt, results, "bbox", image_ids=ids)["map50"], abs=1e-12)
    # more than max_dets detections in one (image, class): only the 100 best count, as in COCO
    many = [{"image_id": ids[0], "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.999 - i * 1e-4}
            for i in range(150)]
    assert coco_image_matches(gt, results + many, ids).map() == pytest.approx(
        coco_map(gt, results + many, "bbox", image_ids=ids)["map50"], abs=1e-12)
    with pytest.raises(ValueError, match="repeat"):
        coco_image_matches(gt, results, ids + ids[:1])


@pytest.mark.parametrize("use_07", [True, False])
def test_voc_point_and_resamples_equal_voc_map_on_duplicated_images(use_07):
    gts, dets = random_voc(3)
    matches = voc_image_matches(gts, dets, 3, use_07_metric=use_07, pixel_offset=0.0)
    assert matches.map() == pytest.approx(voc_map(gts, dets, 3, use_07_metric=use_07, pixel_offset=0.0)["map"],
                                          abs=1e-12)
    picks = resample_indices(len(gts), 5, seed=1)
    boot = bootstrap_map(matches, picks)
    for b, row in enumerate(picks):
        ref = voc_map([gts[i] for i in row], [dets[i] for i in row], 3, use_07_metric=use_07,
                      pixel_offset=0.0)["map"]
        np.testing.assert_allclose(boot[b], ref, atol=1e-12)


@pytest.mark.parametrize("rule", ["coco", "voc07"])
def test_identical_images_collapse_the_interval_to_the_point(rule):
    """Every image the same: every resample is the same dataset, so lo = hi = the point value."""
    n = 9
    if rule == "coco":
        one = {"annotations": [([10, 10, 20, 20], 1), ([50, 50, 30, 20], 2), ([40, 5, 10, 10], 1)],
               "results": [([11, 10, 20, 20], 1, 0.9), ([50, 52, 30, 20], 1, 0.8), ([0, 0, 10, 10], 2, 0.7),
                           ([50, 50, 29, 20], 2, 0.6), ([41, 5, 10, 10], 1, 0.3)]}
        gt = {"images": [{"id": i + 1} for i in range(n)], "categories": [{"id": 1}, {"id": 2}],
              "annotations": [{"id": 10 * i + j + 1, "image_id": i + 1, "category_id": c, "bbox": b,
                               "area": b[2] * b[3], "iscrowd": 0}
                              for i in range(n) for j, (b, c) in enumerate(one["annotations"])]}
        results = [{"image_id": i + 1, "category_id": c, "bbox": b, "score": s}
                   for i in range(n) for b, c, s in one["results"]]
        matches = coco_image_matches(gt, results, list(range(1, n + 1)))
        point = coco_map(gt, results, "bbox")["map50"]
    else:
        g = {"boxes": np.array([[10, 10, 30, 30], [50, 50, 80, 70.0]]), "labels": np.array([0, 1])}
        d = {"boxes": np.array([[11, 10, 30, 30], [0, 0, 9, 9], [50, 51, 80, 70.0]]), "labels": np.array([0, 0, 1]),
             "scores": np.array([0.4, 0.9, 0.5])}
        matches = voc_image_matches([g] * n, [d] * n, 2, pixel_offset=0.0)
        point = voc_map([g] * n, [d] * n, 2, pixel_offset=0.0)["map"]
    assert 0.0 < point < 1.0
    boot = bootstrap_map(matches, resample_indices(n, 200, seed=0))
    np.testing.assert_allclose(boot, point, rtol=0, atol=1e-12)
    ci = interval(point, boot)
    assert ci["lo"] == pytest.approx(point, abs=1e-12) and ci["hi"] == pytest.approx(point, abs=1e-12)


def test_percentile_bootstrap_of_a_mean_matches_numpy_on_the_same_resamples():
    """One class, one object per image, found (with a perfect box) or missed: every detection is a true
    positive, the precision is 1 throughout, and the all-point AP is the recall = the mean of the per-image
    hit indicators. So the bootstrap of mAP must be the bootstrap of that mean, percentile by percentile."""
    rng = np.random.default_rng(5)
    n = 40
    hits = rng.random(n) < 0.6
    box = np.array([[10.0, 10.0, 40.0, 40.0]])
    gts = [{"boxes": box, "labels": np.array([0])} for _ in range(n)]
    dets = [{"boxes": box if h else np.zeros((0, 4)), "labels": np.array([0] if h else [], dtype=np.int64),
             "scores": rng.random(1) if h else np.zeros(0)} for h in hits]
    matches = voc_image_matches(gts, dets, 1, use_07_metric=False, pixel_offset=0.0)
    assert matches.map() == pytest.approx(hits.mean(), abs=1e-12)
    idx = resample_indices(n, 1000, seed=2)
    boot = bootstrap_map(matches, idx)
    means = hits.astype(float)[idx].mean(axis=1)
    np.testing.assert_allclose(boot, means, atol=1e-12)
    lo, hi = percentile_interval(boot, 0.95)
    ref_lo, ref_hi = np.percentile(means, [2.5, 97.5])
    assert lo == pytest.approx(ref_lo, abs=1e-12) and hi == pytest.approx(ref_hi, abs=1e-12)
    assert lo < hits.mean() < hi


def test_paired_difference_of_identical_attacks_is_exactly_zero():
    gt, results = random_coco(4, n_images=15)
    ids = [im["id"] for im in gt["images"]]
    idx = resample_indices(len(ids), 300, seed=9)
    a = bootstrap_map(coco_image_matches(gt, results, ids), idx)
    b = bootstrap_map(coco_image_matches(gt, [dict(r) for r in results], ids), idx)
    assert np.array_equal(a - b, np.zeros_like(a))
    point = coco_image_matches(gt, results, ids).map()
    assert paired_interval(point, point, a, b) == {"value": 0.0, "lo": 0.0, "hi": 0.0}
    # the separate intervals are wide; the paired one is a point
    ci = interval(point, a)
    assert ci["hi"] - ci["lo"] > 0.05


def test_interval_contains_the_point_estimate_and_narrows_with_more_images():
    widths = []
    for n in (10, 80):
        gt, results = random_coco(21, n_images=n)
        ids = [im["id"] for im in gt["images"]]
        m = coco_image_matches(gt, results, ids)
        ci = interval(m.map(), bootstrap_map(m, resample_indices(n, 500, seed=0)))
        assert ci["lo"] <= ci["value"] <= ci["hi"]
        widths.append(ci["hi"] - ci["lo"])
    assert widths[1] < widths[0]


def test_resamples_are_seeded_and_validated():
    a, b = resample_indices(7, 50, seed=3), resample_indices(7, 50, seed=3)
    assert a.shape == (50, 7) and np.array_equal(a, b) and a.min() >= 0 and a.max() < 7
    assert not np.array_equal(a, resample_indices(7, 50, seed=4))
    with pytest.raises(ValueError):
        resample_indices(0, 10)
    with pytest.raises(ValueError):
        resample_indices(5, 0)
    with pytest.raises(ValueError):
        percentile_interval([0.1, 0.2], level=1.0)
    assert np.isnan(percentile_interval([np.nan, np.nan])[0])
    gt, results = random_coco(0, n_images=4)
    m = coco_image_matches(gt, results, [im["id"] for im in gt["images"]])
    with pytest.raises(ValueError, match="outside"):
        bootstrap_map(m, np.array([[0, 1, 2, 4]]))
    # chunking does not change the numbers
    import advdet.metrics.bootstrap as bs

    idx = resample_indices(4, 30, seed=1)
    full = bootstrap_map(m, idx)
    old, bs._CHUNK_CELLS = bs._CHUNK_CELLS, 1
    try:
        np.testing.assert_array_equal(bootstrap_map(m, idx), full)
    finally:
        bs._CHUNK_CELLS = old


# ------------------------------------------------------------------------------------------- benchmark layouts
def _rows(metrics_by_row, labels, attacks, kinds, surrogates, bb):
    return [{"label": lab, "attack": a, "kind": k, "surrogate": s, "sweep": None, "sweep_value": None,
             "metrics": m, "black_box": {"victims": bb}, "white_box": None}
            for lab, a, k, s, m in zip(labels, attacks, kinds, surrogates, metrics_by_row)]


def test_transfer_intervals_black_box_mean_and_paired_rows():
    gt, clean = random_coco(8, n_images=10)
    ids = [im["id"] for im in gt["images"]]
    rng = np.random.default_rng(0)
    weak = [r for r in clean if rng.random() < 0.7]       # some detections gone
    strong = [r for r in clean if rng.random() < 0.3]
    victims = ["v1", "v2"]
    per_row = {0: {"v1": clean, "v2": weak}, 1: {"v1": weak, "v2": strong}, 2: {"v1": weak, "v2": strong}}
    results = {(ri, v): per_row[ri][v] for ri in per_row for v in victims}
    metrics = [{v: {"map50": coco_map(gt, per_row[ri][v], "bbox", image_ids=ids)["map50"]} for v in victims}
               for ri in range(3)]
    rows = _rows(metrics, ["No Attack", "dag", "rad"], [None, "dag", "rad"], ["reference", "detector", "detector"],
                 [None, "s", "s"], victims)
    block = transfer_intervals(rows, results, gt, ids, victims, n_boot=200, seed=1)
    assert block["n_boot"] == 200 and block["images"] == 10 and block["level"] == 0.95
    assert [r["label"] for r in block["rows"]] == ["No Attack", "dag", "rad"]
    for ri, r in enumerate(block["rows"]):
        for v in victims:
            assert r["cells"][v]["value"] == pytest.approx(metrics[ri][v]["map50"])
        assert r["black_box"]["value"] == pytest.approx(np.mean([metrics[ri][v]["map50"] for v in victims]))
    # the black-box mean's interval is that of the per-resample mean of the victims
    idx = resample_indices(10, 200, seed=1)
    s = [bootstrap_map(coco_image_matches(gt, per_row[2][v], ids), idx) for v in victims]
    lo, hi = percentile_interval(np.mean(s, axis=0))
    assert block["rows"][2]["black_box"]["lo"] == pytest.approx(lo) and block["rows"][2]["black_box"]["hi"] == \
        pytest.approx(hi)
    # rad is compared with No Attack and dag; rad and dag saw the same detections: difference exactly 0
    assert [(p["row"], p["baseline"]) for p in block["paired"]] == [("rad", "No Attack"), ("rad", "dag")]
    same = block["paired"][1]
    assert same["black_box"] == {"value": 0.0, "lo": 0.0, "hi": 0.0}
    assert all(c == {"value": 0.0, "lo": 0.0, "hi": 0.0} for c in same["cells"].values())
    assert block["paired"][0]["black_box"]["value"] < 0
    # the layouts
    result = {"victims": victims, "rows": rows, "bootstrap": block}
    cols, table = transfer_interval_table(result)
    assert cols == ["attack", "v1", "v2", "black-box mean"] and table[0][0] == "No Attack"
    assert table[0][1] == fmt_interval(block["rows"][0]["cells"]["v1"]) and "[" in table[0][1]
    cols, table = transfer_paired_table(result)
    assert cols == ["rad", "baseline", "v1", "v2", "black-box mean"]
    assert table[1][2:] == ["+0.0 [+0.0, +0.0]"] * 3
    assert transfer_interval_table({"victims": victims, "rows": rows, "bootstrap": None}) is None


def test_paired_baselines_match_surrogate_and_sweep_value():
    rows = [{"attack": None, "kind": "reference"}, {"attack": "gaussian", "kind": "reference"},
            {"attack": "cls-pgd", "kind": "classifier", "surrogate": "classifier"},
            {"attack": "dag", "kind": "detector", "surrogate": "a"},
            {"attack": "dag", "kind": "detector", "surrogate": "b"},
            {"attack": "rad", "kind": "detector", "surrogate": "a", "sweep": "eps", "sweep_value": 8.0},
            {"attack": "rad", "kind": "detector", "surrogate": "a", "sweep": "eps", "sweep_value": 16.0},
            {"attack": "dfool", "kind": "detector", "surrogate": "a", "sweep": "eps", "sweep_value": 16.0}]
    assert paired_baselines(rows) == [(5, 0), (5, 1), (5, 2), (5, 3), (6, 0), (6, 1), (6, 2), (6, 3), (6, 7)]
    assert paired_baselines(rows, reference="pgd") == []


def test_grid_intervals_pair_every_model_with_the_first():
    idx = resample_indices(6, 100, seed=0)
    gts, dets = random_voc(2, n_images=6)
    fewer = [{k: v[: max(0, len(d["labels"]) - 1)] for k, v in d.items()} for d in dets]
    s_a = bootstrap_map(voc_image_matches(gts, dets, 3), idx)
    s_b = bootstrap_map(voc_image_matches(gts, fewer, 3), idx)
    p_a, p_b = voc_map(gts, dets, 3)["map"], voc_map(gts, fewer, 3)["map"]
    block = grid_intervals({"a": {"clean": p_a}, "b": {"clean": p_b}}, {"a": {"clean": s_a}, "b": {"clean": s_b}},
                           ["a", "b"], n_images=6, n_boot=100, seed=0)
    assert block["baseline"] == "a" and set(block["paired"]) == {"b"}
    assert block["map50"]["b"]["clean"]["value"] == pytest.approx(p_b)
    d = block["paired"]["b"]["clean"]
    assert d["value"] == pytest.approx(p_b - p_a)
    assert (d["lo"], d["hi"]) == pytest.approx(percentile_interval(s_b - s_a))
