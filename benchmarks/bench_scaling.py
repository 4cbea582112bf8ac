"""How the benchmark commands scale (issue 7, "Performance"):

(a) images/s of ``advdet dataset`` (the AOCO detection split: RAD on the yolov3 surrogate, eps 16, 10
    steps, SI, written as a COCO-format folder with its card) for ``--dataset-images`` images;
(b) wall time of ``advdet bench transfer`` (``transfer_matrix``) as it grows with the number of images,
    attacks and victims, one factor at a time around a base configuration, and the least-squares fit
    ``T = a + images * (c_attack * attacks + c_eval * (attacks + 2) * victims)`` (the ``+ 2`` rows are
    No Attack and Ablation, which every table evaluates);
(c) the peak resident memory (max RSS) of each run.

Every configuration runs in a fresh subprocess (``python -c``), so its max RSS is its own and no cache
carries over; the first configuration is run twice and the first (cold-start) run dropped. Torch threads
are set by ``--threads`` (default 1).

    uv run python benchmarks/bench_scaling.py --json benchmarks/results/scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

_CHILD = r"""
import json, resource, sys, time, torch
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
t0 = time.perf_counter()
if cfg["job"] == "transfer":
    from advdet.bench.transfer import transfer_matrix
    transfer_matrix([cfg["surrogate"]], cfg["attacks"], cfg["victims"], cfg["data"], limit=cfg["images"],
                    batch_size=cfg["batch_size"], progress=False, examples=0, relevance=False, device="cpu")
else:
    from advdet.bench.aoco import build_aoco
    build_aoco(cfg["data"], cfg["out"], det_surrogate=cfg["surrogate"], seg_surrogate=None, limit=cfg["images"],
               batch_size=cfg["batch_size"], progress=False, device="cpu")
wall = time.perf_counter() - t0
print(json.dumps({"wall_s": wall, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_child(cfg: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cfg)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(cfg["threads"])})
    if out.returncode:
        raise RuntimeError(f"benchmark child failed for {cfg}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit(rows: list[dict]) -> dict:
    """Least squares T = a + n * (c_attack * A + c_eval * (A + 2) * V) over the transfer rows."""
    X = np.array([[1.0, r["images"] * r["attacks"], r["images"] * (r["attacks"] + 2) * r["victims"]] for r in rows])
    y = np.array([r["wall_s"] for r in rows])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    pred = X @ coef
    return {"a_s": coef[0], "c_attack_s_per_image": coef[1], "c_eval_s_per_image_row_victim": coef[2],
            "max_rel_error": float(np.max(np.abs(pred - y) / y))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="shapes-val")
    ap.add_argument("--surrogate", default="yolov3")
    ap.add_argument("--attacks", default="dfool,loc-shift,size", help="the pool the attack-count sweep draws from")
    ap.add_argument("--victims", default="yolov3,ssd_vgg,retinanet", help="the pool of the victim-count sweep")
    ap.add_argument("--images", default="4,8,16", help="image counts of the image sweep")
    ap.add_argument("--base-images", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dataset-images", type=int, default=8, help="images of the advdet dataset run (0: skip)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default="")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    attacks, victims = args.attacks.split(","), args.victims.split(",")
    base = dict(job="transfer", threads=args.threads, data=args.data, surrogate=args.surrogate,
                batch_size=args.batch_size)
    configs = [(n, attacks[:1], victims[:2]) for n in map(int, args.images.split(","))]
    configs += [(args.base_images, attacks[:k], victims[:2]) for k in range(1, len(attacks) + 1)]
    configs += [(args.base_images, attacks[:1], victims[:k]) for k in range(1, len(victims) + 1)]
    configs = list(dict.fromkeys((n, tuple(a), tuple(v)) for n, a, v in configs))
    rows = []
    run_child({**base, "images": configs[0][0], "attacks": list(configs[0][1]), "victims": list(configs[0][2])})
    for n, a, v in configs:
        res = run_child({**base, "images": n, "attacks": list(a), "victims": list(v)})
        rows.append({"images": n, "attacks": len(a), "victims": len(v), "attack_names": list(a),
                     "victim_names": list(v), **res})
        print(f"transfer images={n} attacks={','.join(a)} victims={','.join(v)}: {res['wall_s']:.1f} s, "
              f"max RSS {res['max_rss_mb']:.0f} MB", flush=True)
    result = {"host": platform.node(), "cpu_count": os.cpu_count(), "threads": args.threads,
              "torch_threads_note": "OMP_NUM_THREADS and torch.set_num_threads both set to --threads",
              "load_average_start": os.getloadavg(), "note": args.note, "transfer": rows,
              "transfer_fit": fit(rows) if len(rows) >= 3 else None}
    if args.dataset_images:
        with tempfile.TemporaryDirectory() as tmp:
            res = run_child({**base, "job": "dataset", "images": args.dataset_images, "out": os.path.join(tmp, "aoco")})
        res["images_per_s"] = args.dataset_images / res["wall_s"]
        result["dataset"] = {"images": args.dataset_images, "attack": "rad (defaults)", **res}
        print(f"dataset: {args.dataset_images} images in {res['wall_s']:.1f} s = {res['images_per_s']:.3f} images/s, "
              f"max RSS {res['max_rss_mb']:.0f} MB", flush=True)
    result["load_average_end"] = os.getloadavg()
    result["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if result["transfer_fit"]:
        print("fit:", json.dumps(result["transfer_fit"]))
    if args.json:
        from advdet.data.io import atomic_write_json

        atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
