"""Attack-framework overhead (issue 4, Performance): PGD-10 on each zoo detector at batch 8.

For every zoo detector this times, on the same shapes-val images with their ground truth as targets:

- ``advdet``: ``build_attack("pgd", model, eps=8, step=2, steps=10)`` (eps and step in 0-255 units), the
  framework's loop (per-image loss normalisation, projection, input checks, mode handling);
- ``bare``: a plain-torch loop of 10 steps on the same model and the same training loss, one batched
  ``model.loss(x, targets)`` call per step (model in eval mode, as in the framework): forward, backward,
  sign step, projection onto the eps ball and [0, 1]; nothing else;
- ``art`` (only when the ``art`` extra is installed, torchvision-family models): the Adversarial
  Robustness Toolbox's ``ProjectedGradientDescent`` on a ``PyTorchObjectDetector`` that wraps the
  same torchvision model (same losses, eps 8/255, step 2/255, 10 iterations, no random start, batch 8).

Reported: images/s of each (wall clock, median of the repeats), and ``overhead = t_advdet / t_bare - 1``
(goal: < 0.10), from wall time and from the process's CPU time (``overhead_cpu``, the steadier number
when other jobs share the machine; with ``--threads 1`` on CPU it is the work done). ``loss_path``
says how the framework gets the gradient of the per-image losses: ``batched`` (one call, the family's
batch loss is the mean of per-image losses; SSD-VGG: one forward, per-image multibox sums) or
``per-image`` (FCOS, torchvision SSD, Mask R-CNN normalise over the whole batch, so the framework calls
the loss once per image to keep batch 8 equal to batch 1; that cost shows in their overhead).

    uv run --frozen python benchmarks/bench_attacks.py [--images 16 --repeats 3 --threads 1
        --device cpu|cuda --models retinanet,yolov3 --out benchmarks/results/attacks.json --note TEXT]
    uv run --frozen --extra art python benchmarks/bench_attacks.py   # adds the ART timings
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from advdet.attacks import build_attack
from advdet.data.coco import CocoDetection
from advdet.data.collate import collate_detection
from advdet.data.io import atomic_write_json
from advdet.data.shapes import write_shapes_split
from advdet.models.detector import Detector
from advdet.models.hub import get_model
from advdet.models.zoo import zoo_entries

EPS, STEP, STEPS, BATCH = 8.0, 2.0, 10, 8


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _loss_path(model) -> str:
    """``batched`` where the family declares a batch-mean loss or overrides ``Detector.per_image_loss`` with
    its own (one forward pass), else ``per-image`` (the contract's default loop)."""
    if model.loss_is_batch_mean or type(model).per_image_loss is not Detector.per_image_loss:
        return "batched"
    return "per-image"


def bare_pgd(model, x: torch.Tensor, targets: list[dict]) -> torch.Tensor:
    """10 plain PGD steps on the model's summed training loss: the reference for the overhead."""
    e, a = EPS / 255.0, STEP / 255.0
    x_adv = x.clone()
    for _ in range(STEPS):
        x_adv.requires_grad_(True)
        loss = sum(model.loss(x_adv, targets).values())
        (g,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            x_adv = torch.minimum(torch.maximum(x_adv + a * g.sign(), x - e), x + e).clamp_(0.0, 1.0)
    return x_adv.detach()


def _art_attack(model, dev: torch.device):
    """ART's PGD on a PyTorchObjectDetector wrapping the torchvision model inside ``model`` (a copy)."""
    import numpy as np
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.object_detection import PyTorchObjectDetector

    tv = copy.deepcopy(model.model).to(dev)
    tv.eval()
    names = tuple(model.loss_names)  # torchvision's loss names of this family
    est = PyTorchObjectDetector(model=tv, input_shape=(3, model.input_size, model.input_size), clip_values=(0.0, 1.0),
                                channels_first=True, attack_losses=names,
                                device_type="gpu" if dev.type == "cuda" else "cpu")
    pgd = ProjectedGradientDescent(est, norm=np.inf, eps=EPS / 255.0, eps_step=STEP / 255.0, max_iter=STEPS,
                                   targeted=False, num_random_init=0, batch_size=BATCH, verbose=False)
    return pgd, model


def _art_run(art, x: torch.Tensor, targets: list[dict]) -> torch.Tensor:
    pgd, model = art
    y = [{"boxes": t["boxes"].detach().cpu().float().numpy(),
          "labels": model.tv_label_of.cpu()[t["labels"].cpu()].numpy()} for t in targets]
    if getattr(model, "has_masks", False):  # Mask R-CNN's loss needs the instance masks
        for d, t in zip(y, targets):
            d["masks"] = t["masks"].detach().cpu().to(torch.uint8).numpy()
    return torch.from_numpy(pgd.generate(x=x.detach().cpu().numpy().astype("float32"), y=y))


def bench_model(name: str, batches, dev: torch.device, repeats: int, with_art: bool) -> dict:
    entry = next(e for e in zoo_entries() if e.name == name)
    trained = entry.trained
    model = (get_model(name) if trained else entry.builder()).to(dev).eval()
    data = [(x.to(dev), [{k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in tg])
            for x, tg in batches]
    n = sum(x.shape[0] for x, _ in data)
    atk = build_attack("pgd", model, eps=EPS, step=STEP, steps=STEPS)

    def run_advdet():
        for x, tg in data:
            atk(x, tg)

    def run_bare():
        for x, tg in data:
            bare_pgd(model, x, tg)

    runners = {"advdet": run_advdet, "bare": run_bare}
    first = {"advdet": lambda x, tg: atk(x, tg), "bare": lambda x, tg: bare_pgd(model, x, tg)}
    if with_art and hasattr(model, "loss_names") and hasattr(model, "tv_label_of"):
        art = _art_attack(model, dev)
        runners["art"] = lambda: [_art_run(art, x, tg) for x, tg in data]
        first["art"] = lambda x, tg: _art_run(art, x, tg)
    x0, tg0 = data[0]
    linf, errors = {}, {}
    for key, fn in list(first.items()):  # warm-up on the first batch, and a check that each one attacks
        torch.manual_seed(0)
        try:
            linf[key] = round(float((fn(x0, tg0).to(x0) - x0).abs().max()) * 255, 3)
        except Exception as err:  # noqa: BLE001 - a third-party tool failing is a result, not a crash
            if key != "art":
                raise
            errors[key] = f"{type(err).__name__}: {err}"
            del runners[key]
    times: dict[str, list[float]] = {k: [] for k in runners}
    cpu: dict[str, list[float]] = {k: [] for k in runners}  # process CPU time: steadier on a busy machine
    for _ in range(repeats):  # interleaved, so load changes hit every runner alike
        for key, fn in runners.items():
            torch.manual_seed(0)
            _sync(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            _sync(dev)
            times[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)
    res = {"model": name, "family": getattr(model, "family", "?"), "trained_weights": trained, "images": n,
           "loss_path": _loss_path(model), "linf_255_first_batch": linf}
    if errors:
        res["errors"] = errors
    for key, ts in times.items():
        res[f"{key}_seconds"] = [round(t, 3) for t in ts]
        res[f"{key}_images_per_s"] = round(n / statistics.median(ts), 2)
    med = {k: statistics.median(v) for k, v in times.items()}
    res["overhead"] = round(med["advdet"] / med["bare"] - 1, 4)
    res["overhead_min"] = round(min(times["advdet"]) / min(times["bare"]) - 1, 4)
    for key, ts in cpu.items():
        res[f"{key}_cpu_seconds"] = [round(t, 3) for t in ts]
    res["overhead_cpu"] = round(statistics.median(cpu["advdet"]) / statistics.median(cpu["bare"]) - 1, 4)
    if "art" in cpu:
        res["art_over_advdet_cpu"] = round(statistics.median(cpu["art"]) / statistics.median(cpu["advdet"]), 3)
    if "art" in med:
        res["art_over_advdet"] = round(med["art"] / med["advdet"], 3)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16, help="shapes-val images (batches of 8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default=None, help="comma-separated zoo detectors (default: all)")
    ap.add_argument("--no-art", action="store_true", help="skip ART even when installed")
    ap.add_argument("--out", default="benchmarks/results/attacks.json")
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    try:
        import art  # noqa: F401
        art_version = art.__version__
    except ImportError:
        art_version = None
    with_art = art_version is not None and not args.no_art
    names = args.models.split(",") if args.models else [e.name for e in zoo_entries() if e.kind == "detector"]

    with tempfile.TemporaryDirectory() as tmp:
        write_shapes_split(tmp, "val", args.images, seed=0, workers=1)  # = the first shapes-val images
        results = []
        for name in names:
            masks = next(e for e in zoo_entries() if e.name == name).with_masks
            ds = CocoDetection(Path(tmp) / "images", Path(tmp) / "instances.json", size=256, with_masks=masks)
            batches = list(DataLoader(Subset(ds, range(args.images)), batch_size=BATCH, collate_fn=collate_detection))
            r = bench_model(name, batches, dev, args.repeats, with_art)
            results.append(r)
            art_txt = (f"  art {r['art_images_per_s']:7.2f} img/s ({r['art_over_advdet']:.2f}x advdet's wall time, "
                       f"{r['art_over_advdet_cpu']:.2f}x its CPU time)") if "art_images_per_s" in r else ""
            print(f"{name:11s} advdet {r['advdet_images_per_s']:7.2f} img/s  bare {r['bare_images_per_s']:7.2f} "
                  f"img/s  overhead {100 * r['overhead']:+6.1f}% wall, {100 * r['overhead_cpu']:+6.1f}% CPU  "
                  f"[{r['loss_path']}]{art_txt}", flush=True)

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = {"benchmark": "PGD-10 (eps 8, step 2, sign, no random start) at batch 8 on shapes-val, GT targets",
           "device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
           "threads": torch.get_num_threads(), "machine": f"{platform.machine()} {os.cpu_count()} cpu",
           "load_average_after": [round(v, 2) for v in load] if load else None,
           "torch": torch.__version__, "python": sys.version.split()[0], "art": art_version,
           "repeats": args.repeats, "note": args.note, "results": results}
    atomic_write_json(Path(args.out), out, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
