"""Bootstrap confidence intervals of mAP50 over images, and paired differences.

The question an interval answers: had the benchmark drawn another set of images of the same kind, how
far could its mAP50 have moved? The percentile bootstrap (Efron and Tibshirani, "An Introduction to
the Bootstrap", 1993, ch. 13) estimates it from the images at hand:

1. draw ``n_boot`` resamples of the ``n`` image indices, uniformly with replacement
   (:func:`resample_indices`, seeded: the same seed gives the same resamples);
2. recompute mAP50 on every resample: an image drawn ``k`` times counts ``k`` times, its detections
   and its ground truths alike, exactly as if the image list held ``k`` copies of it
   (:func:`bootstrap_map`);
3. the ``level`` interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of the
   resampled values (:func:`percentile_interval`, numpy's linear interpolation).

**Paired** comparisons (:func:`paired_interval`) use the same resamples for both sides: resample
``b`` draws the same images for attack A and attack B, and the interval is that of the per-resample
difference A - B. Because both sides see the same images, the image-to-image variation that moves both
cancels, and the interval of a difference is usually much narrower than the two separate intervals
suggest; two identical attacks give a difference of exactly 0 on every resample.

Efficiency: detections are matched to ground truth once per image (:func:`coco_image_matches`, the
COCO protocol at IoU 0.5 as ``pycocotools`` / faster-coco-eval; :func:`voc_image_matches`, the VOC
protocol of :func:`advdet.metrics.voc_map`) into an :class:`ImageMatches` table. Matching is per
image, so a resample only changes how often each image counts: it re-weights the rows of the table
and re-accumulates precision and recall, without matching or sorting again. The value with every
image counted once is the evaluator's own mAP50 (checked by ``tests/test_bootstrap.py``).

Ties: detections of different images with exactly equal scores are ranked by image (the order of
``image_ids``), then by their order within the image, as the evaluators rank them; a resample keeps
that order. Copies of one image's detection are equal in every way, so their order never matters.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_LEVEL",
    "DEFAULT_N_BOOT",
    "ImageMatches",
    "bootstrap_map",
    "coco_image_matches",
    "interval",
    "paired_interval",
    "percentile_interval",
    "resample_indices",
    "voc_image_matches",
]

DEFAULT_N_BOOT = 1000
DEFAULT_LEVEL = 0.95

#: COCO's 101 recall thresholds (pycocotools ``Params.recThrs``)
_COCO_RECALLS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
#: VOC07's 11 recall thresholds, exactly as voc_eval spells them
_VOC07_RECALLS = np.arange(0.0, 1.1, 0.1)
_RULES = ("coco", "voc07", "voc")
#: at most this many (resample x detection) cells are held at once
_CHUNK_CELLS = 250_000


# ------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class ImageMatches:
    """Detections matched to ground truth once, per image; mAP of any image weighting.

    Attributes:
        image_ids: the images, in order; ``counts`` and resample indices refer to these positions.
        rule: how AP is read off the precision/recall curve: ``coco`` (101 recall points, the
            envelope; pycocotools), ``voc07`` (11 points) or ``voc`` (all-point area).
        det_image: (D,) position in ``image_ids`` of each detection.
        det_tp, det_fp: (D,) 1.0 / 0.0 flags; a detection with both 0 is ignored (matched to a
            crowd or difficult GT).
        segments: (K + 1,) offsets: the detections of class ``k`` are ``segments[k]:segments[k+1]``,
            ranked as the evaluator ranks them (score descending, then image, then input order).
        npos: (images, K) ground truths that count (not crowd / difficult) per image and class.
    """

    image_ids: tuple
    rule: str
    det_image: np.ndarray
    det_tp: np.ndarray
    det_fp: np.ndarray
    segments: np.ndarray
    npos: np.ndarray

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_classes(self) -> int:
        return int(self.npos.shape[1])

    def map(self, counts: Any = None) -> float:
        """mAP with image ``i`` counted ``counts[i]`` times (default: once each); NaN when no class
        has ground truth under that weighting."""
        c = np.ones(self.n_images) if counts is None else np.asarray(counts, dtype=np.float64)
        if c.shape != (self.n_images,):
            raise ValueError(f"counts must have shape ({self.n_images},), got {c.shape}")
        return float(self._map_rows(c[None])[0])

    def _map_rows(self, counts: np.ndarray) -> np.ndarray:
        """mAP for every row of ``counts`` (B, images): NaN-mean over the classes with GT."""
        b = counts.shape[0]
        ap = np.full((b, self.num_classes), np.nan)
        npos = counts @ self.npos  # (B, K)
        for k in range(self.num_classes):
            has_gt = npos[:, k] > 0
            if not has_gt.any():
                continue
            s, e = int(self.segments[k]), int(self.segments[k + 1])
            if s == e:  # ground truth but no detection of this class anywhere
                ap[has_gt, k] = 0.0
                continue
            w = counts[:, self.det_image[s:e]]
            tp = np.cumsum(w * self.det_tp[s:e], axis=1)
            fp = np.cumsum(w * self.det_fp[s:e], axis=1)
            rows = np.nonzero(has_gt)[0]
            ap[rows, k] = _ap_rows(tp[rows], fp[rows], npos[rows, k], self.rule)
        out = np.full(b, np.nan)
        valid = ~np.isnan(ap).all(axis=1)
        out[valid] = np.nanmean(ap[valid], axis=1)
        return out


def _ap_rows(tp: np.ndarray, fp: np.ndarray, npos: np.ndarray, rule: str) -> np.ndarray:
    """AP per row of cumulative TP / FP counts (B, D) with ``npos`` (B,) positives, as the evaluators
    compute it from the ranked list (pycocotools ``accumulate``; voc_eval's ``voc_ap``)."""
    rec = tp / npos[:, None]
    if rule == "coco":
        prec = tp / (fp + tp + np.spacing(1))
    else:
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if rule == "voc":  # all-point: area under the envelope with end points (0, 0) and (1, 0)
        n = tp.shape[0]
        mrec = np.concatenate([np.zeros((n, 1)), rec, np.ones((n, 1))], axis=1)
        mpre = np.concatenate([np.zeros((n, 1)), prec, np.zeros((n, 1))], axis=1)
        env = np.maximum.accumulate(mpre[:, ::-1], axis=1)[:, ::-1]
        return np.sum((mrec[:, 1:] - mrec[:, :-1]) * env[:, 1:], axis=1)
    thresholds = _COCO_RECALLS if rule == "coco" else _VOC07_RECALLS
    env = np.maximum.accumulate(prec[:, ::-1], axis=1)[:, ::-1]
    # first ranked position whose recall reaches each threshold (as pycocotools: searchsorted 'left')
    first = np.empty((rec.shape[0], len(thresholds)), dtype=np.int64)
    for i in range(rec.shape[0]):
        first[i] = np.searchsorted(rec[i], thresholds, side="left")
    env = np.concatenate([env, np.zeros((env.shape[0], 1))], axis=1)  # past the end: precision 0
    q = np.take_along_axis(env, first, axis=1)
    return q.mean(axis=1)


def _from_lists(image_ids: Sequence, rule: str, per_class: list[list[tuple]], npos: np.ndarray) -> ImageMatches:
    """Rank each class's detections (score descending; ties: image position, then input order) and pack."""
    det_image, det_tp, det_fp, segments = [], [], [], [0]
    for parts in per_class:
        if parts:
            score = np.concatenate([p[0] for p in parts])
            tp = np.concatenate([p[1] for p in parts])
            fp = np.concatenate([p[2] for p in parts])
            img = np.concatenate([p[3] for p in parts])
            tie = np.concatenate([p[4] for p in parts])
            order = np.lexsort((tie, img, -score))
            det_image.append(img[order])
            det_tp.append(tp[order])
            det_fp.append(fp[order])
            segments.append(segments[-1] + len(order))
        else:
            segments.append(segments[-1])
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    return ImageMatches(tuple(image_ids), rule, cat(det_image, np.int64), cat(det_tp, np.float64),
                        cat(det_fp, np.float64), np.asarray(segments, np.int64), np.asarray(npos, np.float64))


# ------------------------------------------------------------------------------------------- COCO
def _bbox_iou(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """(D, G) IoU of xywh boxes as pycocotools' ``maskUtils.iou`` (a crowd GT: intersection / dt area)."""
    ix = np.minimum(dt[:, None, 0] + dt[:, None, 2], gt[None, :, 0] + gt[None, :, 2]) - \
        np.maximum(dt[:, None, 0], gt[None, :, 0])
    iy = np.minimum(dt[:, None, 1] + dt[:, None, 3], gt[None, :, 1] + gt[None, :, 3]) - \
        np.maximum(dt[:, None, 1], gt[None, :, 1])
    inter = np.where((ix > 0) & (iy > 0), ix * iy, 0.0)
    a_dt = dt[:, 2] * dt[:, 3]
    a_gt = gt[:, 2] * gt[:, 3]
    union = np.where(crowd[None, :], a_dt[:, None], a_dt[:, None] + a_gt[None, :] - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def _coco_match_image(d_boxes, d_scores, g_boxes, g_crowd, g_area, iou_threshold, max_dets, area_rng):
    """One (image, category) of pycocotools' ``evaluateImg`` at one IoU threshold and area range:
    (scores, tp, fp, within-image order) of the kept detections, and the count of GT that counts."""
    g_ignore = g_crowd | (g_area < area_rng[0]) | (g_area > area_rng[1])
    gind = np.argsort(g_ignore, kind="mergesort")
    g_boxes, g_crowd, g_ignore = g_boxes[gind], g_crowd[gind], g_ignore[gind]
    dind = np.argsort(-d_scores, kind="mergesort")[:max_dets]
    d_boxes, d_scores = d_boxes[dind], d_scores[dind]
    nd, ng = len(dind), len(gind)
    tp, fp = np.zeros(nd), np.zeros(nd)
    ious = _bbox_iou(d_boxes, g_boxes, g_crowd) if nd and ng else np.zeros((nd, ng))
    taken = np.zeros(ng, dtype=bool)
    thr = min(iou_threshold, 1 - 1e-10)
    for i in range(nd):
        m = -1
        free = (~taken | g_crowd) & (ious[i] >= thr)
        for group in (free & ~g_ignore, free & g_ignore):  # GT that counts first, ignored ones after
            idx = np.nonzero(group)[0]
            if len(idx):
                best = ious[i, idx]
                m = int(idx[np.nonzero(best == best.max())[0][-1]])  # ties: the later GT, as evaluateImg
                break
        if m >= 0:
            taken[m] = True
            if not g_ignore[m]:
                tp[i] = 1.0
            continue  # matched to an ignored GT: ignored
        area = d_boxes[i, 2] * d_boxes[i, 3]
        if area_rng[0] <= area <= area_rng[1]:
            fp[i] = 1.0
    return d_scores, tp, fp, dind.astype(np.int64), int((~g_ignore).sum())


def coco_image_matches(gt: Mapping, results: Sequence[Mapping], image_ids: Sequence[int], *,
                       iou_threshold: float = 0.5, max_dets: int = 100) -> ImageMatches:
    """Per-image COCO box matches at one IoU threshold (default 0.5: AP50, pycocotools ``stats[1]``).

    Args:
        gt: a COCO instances dict (``images``, ``annotations`` with ``bbox``, ``area``,
            ``iscrowd``, ``categories``); every category counts, as in :func:`~advdet.metrics.coco_map`.
        results: COCO result dicts ``{image_id, category_id, bbox [x, y, w, h], score}``; those of
            images outside ``image_ids`` are left out.
        image_ids: the evaluated images, each once (the positions resamples draw from).
        iou_threshold: a detection matches a GT at IoU ``>=`` this; max_dets: detections kept per
            image and category (the highest scores), as COCO's ``maxDets[-1]``.

    The protocol is pycocotools' ``evaluateImg`` for area range ``all``: detections ranked by score,
    each matched greedily to the unclaimed GT of largest IoU (crowd GT can be claimed again and are
    ignored, as is a detection matched to them). ``ImageMatches.map()`` is then the ``map50`` of
    :func:`~advdet.metrics.coco_map` on the same images.
    """
    ids = [int(i) for i in image_ids]
    if len(set(ids)) != len(ids):
        raise ValueError("image_ids must not repeat an image; resampling counts an image several times")
    pos = {i: p for p, i in enumerate(ids)}
    cat_ids = sorted(int(c["id"]) for c in gt["categories"])
    cat_pos = {c: k for k, c in enumerate(cat_ids)}
    gts: dict[tuple[int, int], list] = defaultdict(list)
    for a in gt.get("annotations", []):
        key = (int(a["image_id"]), int(a["category_id"]))
        if key[0] in pos and key[1] in cat_pos:
            gts[key].append(a)
    dts: dict[tuple[int, int], list] = defaultdict(list)
    for r in results:
        key = (int(r["image_id"]), int(r["category_id"]))
        if key[0] in pos:
            if key[1] not in cat_pos:
                raise ValueError(f"a detection refers to category id {key[1]}, not in the ground truth")
            dts[key].append(r)
    area_rng = (0.0, 1e5 ** 2)
    npos = np.zeros((len(ids), len(cat_ids)), dtype=np.int64)
    per_class: list[list[tuple]] = [[] for _ in cat_ids]
    for key in sorted(set(gts) | set(dts), key=lambda k: (pos[k[0]], cat_pos[k[1]])):
        p, k = pos[key[0]], cat_pos[key[1]]
        g, d = gts.get(key, []), dts.get(key, [])
        g_boxes = np.asarray([a["bbox"] for a in g], np.float64).reshape(-1, 4)
        g_crowd = np.asarray([bool(a.get("iscrowd", 0)) for a in g], bool)
        g_area = np.asarray([a.get("area", a["bbox"][2] * a["bbox"][3]) for a in g], np.float64)
        d_boxes = np.asarray([r["bbox"] for r in d], np.float64).reshape(-1, 4)
        d_scores = np.asarray([r["score"] for r in d], np.float64)
        scores, tp, fp, order, n_gt = _coco_match_image(d_boxes, d_scores, g_boxes, g_crowd, g_area,
                                                        iou_threshold, max_dets, area_rng)
        npos[p, k] = n_gt
        if len(scores):
            per_class[k].append((scores, tp, fp, np.full(len(scores), p, np.int64), order))
    return _from_lists(ids, "coco", per_class, npos)


# ------------------------------------------------------------------------------------------- VOC
def voc_image_matches(gt: Sequence[Mapping[str, Any]], detections: Sequence[Mapping[str, Any]],
                      num_classes: int, *, iou_threshold: float = 0.5, use_07_metric: bool = True,
                      pixel_offset: float = 1.0, image_ids: Sequence | None = None) -> ImageMatches:
    """Per-image VOC matches, with the arguments (and the protocol) of :func:`advdet.metrics.voc_map`;
    ``ImageMatches.map()`` is its ``map``. ``image_ids`` only names the images (default 0..n-1)."""
    from advdet.metrics.voc_map import voc_matches

    scores_c, tp_c, fp_c, order_c, img_c, npos = voc_matches(gt, detections, num_classes, iou_threshold,
                                                             pixel_offset)
    per_class = [list(zip(scores_c[c], tp_c[c], fp_c[c], img_c[c], order_c[c])) for c in range(num_classes)]
    ids = tuple(range(len(gt))) if image_ids is None else tuple(image_ids)
    if len(ids) != len(gt):
        raise ValueError(f"{len(ids)} image_ids for {len(gt)} images")
    return _from_lists(ids, "voc07" if use_07_metric else "voc", per_class, npos)


# ------------------------------------------------------------------------------------------- resampling
def resample_indices(n_images: int, n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> np.ndarray:
    """(n_boot, n_images) image positions drawn uniformly with replacement (numpy ``default_rng(seed)``);
    row ``b`` is resample ``b``. The same arguments give the same array."""
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    return np.random.default_rng(seed).integers(0, n_images, size=(int(n_boot), int(n_images)))


def _counts(indices: np.ndarray, n_images: int) -> np.ndarray:
    """(B, n) multiplicities of every image in every resample."""
    b = indices.shape[0]
    flat = (np.arange(b)[:, None] * n_images + indices).ravel()
    return np.bincount(flat, minlength=b * n_images).reshape(b, n_images).astype(np.float64)


def bootstrap_map(matches: ImageMatches, indices: np.ndarray) -> np.ndarray:
    """mAP on every resample: (B,) for ``indices`` (B, n) from :func:`resample_indices` (NaN where a
    resample holds no ground truth at all). Pass the same ``indices`` to every attack / model that is to
    be compared: that is what makes a comparison paired."""
    idx = np.asarray(indices)
    if idx.ndim != 2:
        raise ValueError(f"indices must be (n_boot, n_images), got shape {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= matches.n_images):
        raise ValueError(f"indices outside [0, {matches.n_images})")
    per_row = max(1, len(matches.det_image) + matches.n_images)
    chunk = max(1, _CHUNK_CELLS // per_row)
    out = np.empty(idx.shape[0])
    for s in range(0, idx.shape[0], chunk):
        out[s:s + chunk] = matches._map_rows(_counts(idx[s:s + chunk], matches.n_images))
    return out


# ------------------------------------------------------------------------------------------- intervals
def percentile_interval(samples: Any, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """The ``level`` percentile interval of bootstrap ``samples``: their ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles (numpy's default linear interpolation), NaN resamples left out;
    (NaN, NaN) when none is left."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    s = np.asarray(samples, dtype=np.float64).reshape(-1)
    s = s[~np.isnan(s)]
    if not len(s):
        return float("nan"), float("nan")
    lo, hi = np.quantile(s, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def interval(value: float | None, samples: Any, level: float = DEFAULT_LEVEL) -> dict:
    """``{"value", "lo", "hi"}``: the point estimate (the evaluator's number on the images as they
    are) and the percentile interval of its bootstrap ``samples``; None for what is undefined."""
    lo, hi = percentile_interval(samples, level)

    def f(x):
        return None if x is None or np.isnan(x) else float(x)

    return {"value": f(value), "lo": f(lo), "hi": f(hi)}


def paired_interval(value_a: float | None, value_b: float | None, samples_a: Any, samples_b: Any,
                    level: float = DEFAULT_LEVEL) -> dict:
    """The interval of the difference A - B from samples drawn on the same resamples (row ``b`` of
    both from the same images): ``{"value": a - b, "lo", "hi"}``."""
    a = np.asarray(samples_a, dtype=np.float64)
    b = np.asarray(samples_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in shape: {a.shape} vs {b.shape}")
    diff = None if value_a is None or value_b is None else float(value_a) - float(value_b)
    return interval(diff, a - b, level)
