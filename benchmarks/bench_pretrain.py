"""Seconds per pretraining update of the backbone entries (resnet_pre, vgg_pre, darknet_pre), one process.

    uv run --frozen python benchmarks/bench_pretrain.py [--batch 32] [--repeats 3] [--threads 1]

Times forward + backward + AdamW step of each entry's classifier on random 96 px images, scaled to the
recipe's 128-image batch, and the recipe's expected training time (``epochs x updates per epoch``) from it.
On a busy machine read the ratios between entries rather than the absolute seconds.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from advdet.models.zoo import PRETRAIN_DATA, PRETRAIN_RECIPE, zoo_entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s = PRETRAIN_DATA["size"]
    n_train = PRETRAIN_DATA["num_classes"] * PRETRAIN_DATA["train_per_class"]
    updates = PRETRAIN_RECIPE["epochs"] * (n_train // PRETRAIN_RECIPE["batch_size"])
    rows = []
    for name in ("resnet_pre", "vgg_pre", "darknet_pre"):
        torch.manual_seed(0)
        m = zoo_entry(name).builder().train()
        opt = torch.optim.AdamW(m.parameters(), 1e-3)
        x = torch.rand(args.batch, 3, s, s)
        t = [{"labels": torch.tensor([i % m.num_classes])} for i in range(args.batch)]
        times = []
        for i in range(args.repeats + 1):
            t0 = time.perf_counter()
            loss = m.loss(x, t)["cls"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:  # the first update warms up
                times.append(time.perf_counter() - t0)
        per_update = min(times) * PRETRAIN_RECIPE["batch_size"] / args.batch
        rows.append({"name": name, "parameters": sum(p.numel() for p in m.parameters()),
                     "seconds_per_update": round(per_update, 3), "recipe_updates": updates,
                     "recipe_hours": round(per_update * updates / 3600, 2)})
    base = rows[0]["seconds_per_update"]
    print(f"{'entry':<12} {'params':>9} {'s/update':>9} {'x resnet':>9} {'recipe h':>9}")
    for r in rows:
        r["ratio_to_resnet_pre"] = round(r["seconds_per_update"] / base, 2)
        print(f"{r['name']:<12} {r['parameters']:>9} {r['seconds_per_update']:>9.3f} {r['ratio_to_resnet_pre']:>9.2f} "
              f"{r['recipe_hours']:>9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "batch": args.batch, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
