"""Benchmark: advdet.metrics.coco_map (faster-coco-eval) against pycocotools' COCOeval.

Synthetic COCO-sized data (seeded numpy): 5000 images of 640x480 with 1-7 GT boxes each over 80
classes, and 100 detections per image (jittered GT boxes with mostly right classes, plus random
boxes). Both evaluators run on the same data in the same process; each timing covers the whole call
a user makes (index building, loading the results, evaluate, accumulate, summarize). Wall time and
process CPU time are both reported: on a shared machine the CPU time is the steadier number.

    uv run python benchmarks/bench_coco_map.py [--images 5000] [--dets 100] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import platform
import time

import numpy as np

from advdet.data.io import atomic_write_json
from advdet.metrics import COCO_METRIC_KEYS, coco_map

PC_INDEX = {"map": 0, "map50": 1, "map75": 2, "map_small": 3, "map_medium": 4, "map_large": 5, "ar100": 8}


def make_data(num_images: int, dets_per_image: int, num_classes: int = 80, seed: int = 0):
    rng = np.random.default_rng(seed)
    width, height = 640, 480
    images, anns, dets = [], [], []
    for img_id in range(1, num_images + 1):
        images.append({"id": img_id, "width": width, "height": height, "file_name": f"{img_id:012d}.jpg"})
        n = int(rng.integers(1, 8))
        wh = np.exp(rng.uniform(np.log(8), np.log(400), (n, 2)))  # small, medium and large
        xy = rng.uniform(0, 1, (n, 2)) * (np.array([width, height]) - wh).clip(min=1)
        cats = rng.integers(1, num_classes + 1, n)
        for b in range(n):
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": int(cats[b]), "iscrowd": 0,
                         "bbox": [float(xy[b, 0]), float(xy[b, 1]), float(wh[b, 0]), float(wh[b, 1])],
                         "area": float(wh[b, 0] * wh[b, 1])})
        # half the detections jitter a GT box (class right 80% of the time), half are random
        k = dets_per_image // 2
        src = rng.integers(0, n, k)
        jxy = xy[src] + rng.normal(0, 0.1, (k, 2)) * wh[src]
        jwh = wh[src] * np.exp(rng.normal(0, 0.15, (k, 2)))
        jcat = np.where(rng.random(k) < 0.8, cats[src], rng.integers(1, num_classes + 1, k))
        r = dets_per_image - k
        rwh = np.exp(rng.uniform(np.log(8), np.log(300), (r, 2)))
        rxy = rng.uniform(0, 1, (r, 2)) * (np.array([width, height]) - rwh).clip(min=1)
        rcat = rng.integers(1, num_classes + 1, r)
        boxes = np.concatenate([np.concatenate([jxy, jwh], 1), np.concatenate([rxy, rwh], 1)])
        labels = np.concatenate([jcat, rcat])
        scores = np.concatenate([rng.uniform(0.3, 1.0, k), rng.uniform(0.0, 0.7, r)])
        for box, lab, sc in zip(boxes.tolist(), labels.tolist(), scores.tolist()):
            dets.append({"image_id": img_id, "category_id": lab, "bbox": box, "score": sc})
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, num_classes + 1)]
    return {"images": images, "annotations": anns, "categories": categories}, dets


def run_pycocotools(gt: dict, dets: list[dict]) -> dict:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(ev.stats[i]) for k, i in PC_INDEX.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=100, help="detections per image")
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-pycocotools", action="store_true")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON")
    args = parser.parse_args()

    t0 = time.perf_counter()
    gt, dets = make_data(args.images, args.dets, args.classes, args.seed)
    t_data = time.perf_counter() - t0
    print(f"data: {len(gt['images'])} images, {len(gt['annotations'])} GT boxes, {len(dets)} detections, "
          f"{args.classes} classes (generated in {t_data:.1f} s)")

    # each evaluator gets its own copy (pycocotools adds keys to the dicts it is given)
    t0, c0 = time.perf_counter(), time.process_time()
    ours = coco_map(gt, dets)
    t_ours, c_ours = time.perf_counter() - t0, time.process_time() - c0

    result = {"num_images": len(gt["images"]), "num_gt": len(gt["annotations"]), "num_detections": len(dets),
              "num_classes": args.classes, "seed": args.seed, "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(),
              "coco_map_s": t_ours, "coco_map_cpu_s": c_ours, "coco_map": ours}
    rows = [("advdet coco_map (faster-coco-eval)", t_ours, c_ours, ours)]
    if not args.skip_pycocotools:
        gt_pc, dets_pc = copy.deepcopy(gt), copy.deepcopy(dets)
        t0, c0 = time.perf_counter(), time.process_time()
        ref = run_pycocotools(gt_pc, dets_pc)
        t_ref, c_ref = time.perf_counter() - t0, time.process_time() - c0
        rows.append(("pycocotools COCOeval", t_ref, c_ref, ref))
        max_diff = max(abs(ours[k] - ref[k]) for k in COCO_METRIC_KEYS)
        result.update(pycocotools_s=t_ref, pycocotools_cpu_s=c_ref, pycocotools=ref,
                      speedup=t_ref / t_ours, max_abs_diff=max_diff)

    header = f"{'evaluator':<36} {'wall (s)':>9} {'cpu (s)':>8} " + " ".join(f"{k:>10}" for k in COCO_METRIC_KEYS)
    print(header)
    print("-" * len(header))
    for name, t, c, stats in rows:
        print(f"{name:<36} {t:>9.2f} {c:>8.2f} " + " ".join(f"{stats[k]:>10.4f}" for k in COCO_METRIC_KEYS))
    result["load_average_1min_end"] = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPUs, 1-min load average at the end {result['load_average_1min_end']:.2f}")
    if "speedup" in result:
        print(f"speedup {result['speedup']:.1f}x, max |difference| {result['max_abs_diff']:.2e}")
    if args.json:
        atomic_write_json(args.json, result, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
