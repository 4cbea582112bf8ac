"""Cost of RAD (issue 5, "Performance"):

(a) seconds of one RAD iteration (default: SI, static top-20 cls nodes, exact second-order relevance
    gradient) against one PGD iteration with the same SI on the same surrogate and batch (goal: <= 3x);
(b) images/s of the full default RAD (10 iterations, SI, eps 16, step 2) on each zoo surrogate at
    batch 8, on the CPU (torch threads = 1) and on CUDA when present, with RAD's diagnostics;
(c) ``--memory``: the peak resident memory of a fresh process that loads the surrogate and the batch
    and runs RAD on it (``ru_maxrss`` of a spawned child), and the same process before the attack.

``--preset`` (default ``reference``) and ``--micro-batch`` (default ``auto``: the surrogate's
``relevance_cpu_micro_batch`` images per relevance graph on the CPU) select the RAD configuration;
``--no-channels-last`` loads the surrogate with contiguous weights instead of ``get_model``'s NHWC default.

An iteration's time is ``(T(steps=k) - T(steps=0)) / k`` of whole ``attack()`` calls (the same batch,
``prepare`` cancels out), so it includes everything the loop does per step (RAD: node selection and
its relevance map; PGD: its loss). Wall and CPU (process) seconds are both recorded: on a shared
machine CPU seconds are the steadier number. Surrogates use the shipped zoo weights when present,
else the untrained builder (the cost of RAD does not depend on the weights, except for the rare
second term and the proposal counts of two-stage models); each row says which.

    uv run python benchmarks/bench_rad.py --json benchmarks/results/rad.json
    # reduced: --batch 2 --rad-steps 1 --ratio-steps 1 --repeats 1 --note "..."
    uv run python benchmarks/bench_rad.py --memory --skip-ratio --skip-throughput --models yolov3,ssd_vgg
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import platform
import time

import torch

from advdet.attacks.pgd import PGD
from advdet.attacks.rad import RAD
from advdet.attacks.transforms import SI
from advdet.data.io import atomic_write_json
from advdet.models.hub import get_model
from advdet.models.zoo import zoo_entries, zoo_entry


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def load_batch(data: str, n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, list[dict] | None, str]:
    """The first ``n`` images of ``data`` letterboxed to ``size`` (with their targets), or uniform noise
    for ``data="random"``; returns (x, targets, description)."""
    if data != "random":
        from advdet.data.collate import collate_detection
        from advdet.data.registry import build_dataset

        ds = build_dataset(data, size=size)
        x, targets = collate_detection([ds[i] for i in range(n)])
        return x, targets, f"{data} (first {n} images)"
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), None, "uniform noise"


def surrogate(name: str, channels_last: bool = True) -> tuple[torch.nn.Module, str]:
    entry = zoo_entry(name)
    if entry.trained:
        return get_model(name, channels_last=channels_last), "zoo weights"
    torch.manual_seed(0)
    return get_model(name, pretrained=False, channels_last=channels_last), "untrained (no shipped weights yet)"


def surrogate_and_batch(name: str, data: str, n: int, dev: torch.device, channels_last: bool = True):
    """(surrogate on ``dev``, its weights note, batch x, targets, data description) for one zoo detector;
    ``channels_last``: its 4-D weights stored NHWC, as ``get_model`` does by default."""
    det, weights = surrogate(name, channels_last)
    det.to(dev)
    x, targets, desc = load_batch(data, n, det.input_size)
    return det, weights, x, targets, desc


def timed(fn, dev: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    _sync(dev)
    w, c = time.perf_counter(), time.process_time()
    fn()
    _sync(dev)
    return time.perf_counter() - w, time.process_time() - c


def per_iteration(make_attack, x, targets, k: int, repeats: int, dev: torch.device) -> dict:
    """Seconds per iteration, ``(T(k) - T(0)) / k``, best of ``repeats`` (wall and CPU)."""
    x = x.to(dev)
    tg = None if targets is None else targets
    runs = {0: [], k: []}
    make_attack(1)(x, tg)  # warm-up
    for _ in range(repeats):
        for steps in (0, k):
            atk = make_attack(steps)
            runs[steps].append(timed(lambda: atk(x, tg), dev))
    w0, c0 = min(r[0] for r in runs[0]), min(r[1] for r in runs[0])
    wk, ck = min(r[0] for r in runs[k]), min(r[1] for r in runs[k])
    return {"wall_s": max(wk - w0, 0.0) / k, "cpu_s": max(ck - c0, 0.0) / k, "steps": k, "repeats": repeats}


def rad_kwargs(args) -> dict:
    mb = args.micro_batch
    return {"preset": args.preset, "micro_batch": None if mb == "none" else ("auto" if mb == "auto" else int(mb))}


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM) in GB. Not ``ru_maxrss``: Linux keeps that across
    ``exec``, so a child spawned by a large parent would report the parent's peak."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # not Linux: KiB


def _memory_child(name: str, data: str, n: int, steps: int, kw: dict, threads: int, channels_last: bool,
                  queue) -> None:
    torch.set_num_threads(threads)
    det, weights, x, targets, _ = surrogate_and_batch(name, data, n, torch.device("cpu"), channels_last)
    before = peak_rss_gb()
    RAD(det, steps=steps, **kw)(x, targets)
    queue.put({"surrogate": name, "weights": weights, "batch": n, "rad_steps": steps, "rad_kwargs": kw,
               "channels_last": channels_last, "peak_rss_gb": peak_rss_gb(), "rss_before_attack_gb": before})


def bench_memory(names: list[str], args) -> list[dict]:
    rows, ctx = [], mp.get_context("spawn")
    for name in names:
        q = ctx.Queue()
        p = ctx.Process(target=_memory_child, args=(name, args.data, args.batch, args.memory_steps, rad_kwargs(args),
                                                     args.threads, args.channels_last, q))
        p.start()
        row = q.get()
        p.join()
        rows.append(row)
        print(f"[memory] {name:<12} batch {row['batch']}  peak {row['peak_rss_gb']:.2f} GB "
              f"(before the attack {row['rss_before_attack_gb']:.2f} GB)  {row['rad_kwargs']}", flush=True)
    return rows


def bench_ratio(names: list[str], args, dev: torch.device) -> list[dict]:
    rows = []
    for name in names:
        det, weights, x, targets, desc = surrogate_and_batch(name, args.data, args.ratio_batch, dev, args.channels_last)
        rad = per_iteration(lambda s: RAD(det, steps=s, **rad_kwargs(args)), x, targets, args.ratio_steps, args.repeats, dev)
        pgd = per_iteration(lambda s: PGD(det, eps=16, step=2, steps=s, transforms=[SI()]), x, targets,
                            args.ratio_steps, args.repeats, dev)
        row = {"surrogate": name, "weights": weights, "device": str(dev), "batch": args.ratio_batch,
               "channels_last": args.channels_last,
               "input_size": det.input_size, "data": desc, "rad_kwargs": rad_kwargs(args), "rad_iteration": rad, "pgd_si_iteration": pgd,
               "ratio_wall": rad["wall_s"] / pgd["wall_s"] if pgd["wall_s"] > 0 else None,
               "ratio_cpu": rad["cpu_s"] / pgd["cpu_s"] if pgd["cpu_s"] > 0 else None}
        rows.append(row)
        print(f"[ratio] {name:<12} {dev.type}  RAD {rad['cpu_s']:.3f} s/it CPU ({rad['wall_s']:.3f} wall)  "
              f"PGD+SI {pgd['cpu_s']:.3f} s/it CPU ({pgd['wall_s']:.3f} wall)  "
              f"ratio {row['ratio_cpu']:.2f} CPU / {row['ratio_wall']:.2f} wall", flush=True)
    return rows


def bench_throughput(names: list[str], args, dev: torch.device) -> list[dict]:
    rows = []
    for name in names:
        det, weights, x, targets, desc = surrogate_and_batch(name, args.data, args.batch, dev, args.channels_last)
        x = x.to(dev)
        atk = RAD(det, steps=args.rad_steps, **rad_kwargs(args))
        atk(x[:1], None if targets is None else targets[:1])  # warm-up
        wall, cpu = timed(lambda: atk(x, targets), dev)
        row = {"surrogate": name, "weights": weights, "device": str(dev), "batch": args.batch,
               "input_size": det.input_size, "data": desc, "rad_steps": args.rad_steps, "wall_s": wall,
               "cpu_s": cpu, "images_per_s": args.batch / wall, "images_per_cpu_s": args.batch / cpu,
               "rad_kwargs": rad_kwargs(args), "channels_last": args.channels_last,
               "diagnostics": atk.last_state["diagnostics"].as_dict()}
        rows.append(row)
        print(f"[rad]   {name:<12} {dev.type}  batch {args.batch}  {args.rad_steps} steps  "
              f"{row['images_per_s']:.3f} img/s wall  {row['images_per_cpu_s']:.3f} img/CPU-s  ({weights})", flush=True)
    return rows


def main() -> None:
    detectors = [e.name for e in zoo_entries() if e.kind == "detector" and e.init is None]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(detectors), help="zoo surrogates for (b)")
    ap.add_argument("--ratio-models", default="yolov3,ssd_vgg", help="surrogates for (a)")
    ap.add_argument("--batch", type=int, default=8, help="batch of the full RAD runs (b)")
    ap.add_argument("--ratio-batch", type=int, default=8, help="batch of the per-iteration timing (a)")
    ap.add_argument("--rad-steps", type=int, default=10, help="RAD iterations in (b) (default: RAD's 10)")
    ap.add_argument("--ratio-steps", type=int, default=2, help="k of (T(k) - T(0)) / k in (a)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--data", default="shapes-val", help="shapes-val, an images folder, or 'random'")
    ap.add_argument("--devices", default="auto", help="cpu, cuda, cpu,cuda or auto (cpu + cuda when present)")
    ap.add_argument("--preset", default="reference", help="RAD preset: reference or paper")
    ap.add_argument("--micro-batch", default="auto", help="RAD micro_batch: auto, none or an int")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                    help="surrogate weights stored NHWC, get_model's default (--no-channels-last: contiguous)")
    ap.add_argument("--memory", action="store_true", help="(c): peak memory of RAD on --batch images")
    ap.add_argument("--memory-steps", type=int, default=1, help="RAD iterations in (c)")
    ap.add_argument("--skip-ratio", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    ap.add_argument("--json", default=None, help="write the results here (e.g. benchmarks/results/rad.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    devs = (["cpu", "cuda"] if args.devices == "auto" else args.devices.split(","))
    devs = [torch.device(d) for d in devs if d != "cuda" or torch.cuda.is_available()]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = {"settings": {k: v for k, v in vars(args).items() if k != "json"},
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "load_average_at_start": load,
                       "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
           "ratio": [], "throughput": [], "memory": []}
    for dev in devs:
        if not args.skip_ratio:
            out["ratio"] += bench_ratio([n for n in args.ratio_models.split(",") if n], args, dev)
        if not args.skip_throughput:
            out["throughput"] += bench_throughput([n for n in args.models.split(",") if n], args, dev)
    if args.memory:
        out["memory"] = bench_memory([n for n in args.models.split(",") if n], args)
    out["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.json:
        atomic_write_json(args.json, out, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
