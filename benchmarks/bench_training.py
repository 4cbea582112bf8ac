"""Training throughput (images per second, clean + adversarial images per update) of the training methods
on the zoo's SSD-VGG (shapes-train, batch 16), through the real loop (``train_detector``), on the CPU and,
when present, on CUDA; plus the projected wall time of each robust zoo recipe.

    uv run python benchmarks/bench_training.py [--methods standard,mtd,robustdet] [--schedules interleaved,plain]
        [--batch 16] [--iters 4] [--warmup 1] [--pgd-steps 20] [--threads 1] [--devices cpu,cuda]
        [--synthetic] [--json benchmarks/results/training.json]

Each (method, schedule, device) runs ``warmup + iters`` updates from the zoo's ssd_vgg weights (random
weights when they are not trained yet; the card says which); the throughput is taken over the last
``iters`` updates from the per-update times the loop logs. ``interleaved`` costs one PGD step per update,
``plain`` a full ``--pgd-steps`` PGD per update.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from advdet.models.zoo import ZOO_INPUT_SIZE, zoo_entries, zoo_entry
from advdet.training.methods import MethodConfig, build_step_fn, prepare_model, split_recipe
from advdet.training.standard import TrainConfig, train_detector
from advdet.training.tensor_cache import TensorCache


def synthetic_cache(n: int, size: int, seed: int = 0) -> TensorCache:
    """n random images with 1-4 boxes each (when shapes-train is not wanted)."""
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 3, size, size, generator=g) * 255).to(torch.uint8)
    boxes, labels = [], []
    for _ in range(n):
        k = int(torch.randint(1, 5, (), generator=g))
        xy = torch.rand(k, 2, generator=g) * size * 0.6
        wh = 16 + torch.rand(k, 2, generator=g) * size * 0.35
        boxes.append(torch.cat([xy, (xy + wh).clamp(max=size)], 1))
        labels.append(torch.randint(0, 8, (k,), generator=g))
    return TensorCache(images, boxes, labels)


def measure(method: str, schedule: str, cache: TensorCache, device: torch.device, args, init: str | None) -> dict:
    mcfg = MethodConfig(schedule=schedule, pgd_steps=args.pgd_steps)
    model = prepare_model(method, "ssd_vgg", init, seed=0, cfg=mcfg).to(device)
    step = build_step_fn(method, mcfg)
    total = args.warmup + args.iters
    cfg = TrainConfig(iters=total, batch_size=args.batch, optimizer="sgd", lr=1e-3, lr_schedule="constant",
                      warmup_iters=0, log_every=1, checkpoint_every=10 ** 9, augment=True, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = train_detector(model, cache, cfg, tmp, step_fn=step)
        wall = time.perf_counter() - t0
        hist = torch.load(Path(tmp) / "checkpoint.pt", weights_only=True)["history"]
    secs = {h["iteration"]: h["seconds"] for h in hist}
    dt = secs[total] - (secs[args.warmup] if args.warmup else 0.0)
    return {"method": method, "schedule": schedule if method != "standard" else "-",
            "pgd_steps": args.pgd_steps if method != "standard" else 0, "device": str(device),
            "threads": torch.get_num_threads(), "batch": args.batch, "iters_timed": args.iters,
            "seconds_per_update": round(dt / args.iters, 3), "images_per_second": round(args.batch * args.iters / dt, 2),
            "wall_seconds": round(wall, 1), "final_loss": summary["history"][-1].get("loss")}


FALLBACK = {"at-cls": ["at-loc", "cwat", "mtd"], "at-loc": ["at-cls", "cwat", "mtd"], "cwat": ["at-cls", "at-loc", "mtd"],
            "mtd": [], "robustdet": ["robustdet-cfr"], "robustdet-cfr": ["robustdet"]}


def recipe_projection(rows: list[dict]) -> list[dict]:
    """Projected wall time of each robust zoo recipe from the measured seconds per update (CPU rows of the
    same method, else of the closest measured one: ``measured_as``)."""
    out = []
    for e in zoo_entries():
        if e.method == "standard":
            continue
        tcfg, mcfg = split_recipe(e.recipe)
        cpu = {r["method"]: r for r in rows if r["device"] == "cpu" and r["schedule"] == mcfg.schedule
               and r["batch"] == tcfg.batch_size and r["pgd_steps"] == mcfg.pgd_steps}
        r = next((cpu[m] for m in [e.method] + FALLBACK.get(e.method, []) if m in cpu), None)
        if r is None:
            continue
        iters = tcfg.iters or round(tcfg.epochs * (4000 // tcfg.batch_size))
        out.append({"zoo": e.name, "method": e.method, "iters": iters, "batch": tcfg.batch_size,
                    "schedule": mcfg.schedule, "measured_as": r["method"], "threads": r["threads"],
                    "projected_hours": round(iters * r["seconds_per_update"] / 3600, 2)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="standard,mtd,robustdet")
    ap.add_argument("--schedules", default="interleaved")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--pgd-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--synthetic", action="store_true", help="random images instead of shapes-train")
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    ap.add_argument("--json", default="benchmarks/results/training.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.synthetic:
        cache = synthetic_cache(max(64, 4 * args.batch), ZOO_INPUT_SIZE)
        data = "synthetic"
    else:
        from advdet.data.registry import build_dataset

        cache = TensorCache.from_dataset(build_dataset("shapes-train", size=ZOO_INPUT_SIZE))
        data = "shapes-train"
    init = "ssd_vgg" if zoo_entry("ssd_vgg").trained else None
    devices = [torch.device(d) for d in args.devices.split(",") if d == "cpu" or torch.cuda.is_available()]
    rows = []
    for dev in devices:
        for method in args.methods.split(","):
            for schedule in (["interleaved"] if method == "standard" else args.schedules.split(",")):
                r = measure(method, schedule, cache, dev, args, init)
                rows.append(r)
                print(f"{r['method']:<14} {r['schedule']:<12} {r['device']:<6} batch {r['batch']}  "
                      f"{r['seconds_per_update']:7.2f} s/update  {r['images_per_second']:7.2f} images/s", flush=True)
    proj = recipe_projection(rows)
    for p in proj:
        print(f"recipe {p['zoo']:<16} {p['iters']} updates x batch {p['batch']}: ~{p['projected_hours']} h "
              f"at {p['threads']} thread(s) (measured as {p['measured_as']})")
    out = {"model": "ssd_vgg (zoo)", "init": init or "random (zoo ssd_vgg not trained yet)", "data": data,
           "machine": f"{platform.machine()} {torch.get_num_threads()} thread(s), torch {torch.__version__}",
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "note": args.note, "rows": rows, "recipes": proj}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
