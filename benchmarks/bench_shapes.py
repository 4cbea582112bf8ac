"""Speed of the shapes benchmark generator: images per second for 4000 train + 500 val images.

    uv run python benchmarks/bench_shapes.py [--train 4000 --val 500 --workers N --json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

from advdet.data.shapes import generate_shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        summary = generate_shapes(tmp, args.train, args.val, seed=0, workers=args.workers)
        wall = time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp) for f in fs)
    n = args.train + args.val
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = {"images": n, "seconds": round(wall, 2), "images_per_second": round(n / wall, 1),
           "objects": sum(s["objects"] for s in summary["splits"].values()), "bytes": size,
           "cpu_seconds": round(time.process_time() - c0 + children.ru_utime + children.ru_stime, 2),
           "cpus": os.cpu_count(), "goal": "4500 images in under 60 s"}
    print(f"shapes: {n} images ({out['objects']} objects, {size / 1e6:.0f} MB) in {wall:.1f} s "
          f"= {out['images_per_second']} images/s on {out['cpus']} CPUs (CPU time {out['cpu_seconds']} s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
