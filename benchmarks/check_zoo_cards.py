"""Re-measure every shipped zoo entry on shapes-val and compare with its card (what `advdet eval` prints).

    uv run python benchmarks/check_zoo_cards.py [NAME ...] [--threads N] [--json OUT]

For each trained entry (default: all) it loads the shipped weights, evaluates them on the 500 shapes-val
images as `advdet eval --model NAME --data shapes-val` does (detectors: box mAP / mAP50 / mAP75; the
classifier: top-1; the pretrained backbones: top-1 / top-5 on their procedural validation split), and prints the card's numbers next to the measured ones with the largest absolute
difference. It also sums the shipped file sizes (detector zoo, robust entries, all). Exit status 1 when a
difference exceeds --tol (default 0.002).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from advdet.models.hub import get_model
from advdet.models.zoo import zoo_entries, zoo_entry
from advdet.training.zoo_train import pretrain_val_metrics, shapes_val_metrics

KEYS = {"detector": ("map", "map50", "map75"), "classifier": ("top1",), "backbone": ("top1", "top5")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="zoo entries (default: every trained entry)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tol", type=float, default=0.002)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    entries = [zoo_entry(n) for n in args.names] if args.names else [e for e in zoo_entries() if e.trained]
    rows, worst = [], 0.0
    print(f"{'entry':<16} {'metric':<6} {'card':>7} {'measured':>9} {'|diff|':>7} {'seconds':>8}")
    for e in entries:
        card = e.card
        t0 = time.perf_counter()
        key = "procedural_val" if "procedural_val" in card else "shapes_val"
        if key == "procedural_val":  # a backbone, or the classifier that adopts resnet_pre's weights
            data = e.data or zoo_entry(e.backbone_init).data
            measured = pretrain_val_metrics(get_model(e.name), data)
        else:
            measured = shapes_val_metrics(get_model(e.name), e.kind, None)
        card_metrics = card[key]
        keys = KEYS["backbone"] if key == "procedural_val" else KEYS[e.kind]
        seconds = time.perf_counter() - t0
        diffs = {}
        for k in keys:
            diffs[k] = abs(measured[k] - card_metrics[k])
            print(f"{e.name:<16} {k:<6} {card_metrics[k]:>7.4f} {measured[k]:>9.4f} {diffs[k]:>7.4f} {seconds:>8.1f}")
        worst = max(worst, *diffs.values())
        rows.append({"name": e.name, "kind": e.kind, "card": {k: card_metrics[k] for k in keys},
                     "measured": {k: measured[k] for k in keys}, "max_abs_diff": max(diffs.values()),
                     "seconds": round(seconds, 1), "file_size": card["file_size"], "sha256": card["sha256"]})
    robust = {e.name for e in zoo_entries() if e.init is not None}
    sizes = {"zoo_without_robust": sum(e.card["file_size"] for e in zoo_entries() if e.trained and e.name not in robust),
             "robust": sum(e.card["file_size"] for e in zoo_entries() if e.trained and e.name in robust)}
    sizes["all"] = sizes["zoo_without_robust"] + sizes["robust"]
    print(f"largest |card - measured|: {worst:.4f}; shipped weights: " +
          ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "tol": args.tol, "rows": rows, "max_abs_diff": worst,
                       "shipped_bytes": sizes}, f, indent=1)
    sys.exit(1 if worst > args.tol else 0)


if __name__ == "__main__":
    main()
