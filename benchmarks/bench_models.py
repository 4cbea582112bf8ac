"""Forward and forward+backward time per image at batch 8 for each zoo model, plus torchvision's
Faster R-CNN R50-FPN at 416 px (random weights) as the real-size reference.

    uv run python benchmarks/bench_models.py [--batch 8 --repeats 3 --threads N --device cpu|cuda --json OUT]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from advdet.models.hub import get_model
from advdet.models.zoo import zoo_entries


def _targets(b: int, s: int, masks: bool) -> list[dict]:
    out = []
    for i in range(b):
        t = {"boxes": torch.tensor([[0.1 * s, 0.2 * s, 0.5 * s, 0.6 * s], [0.5 * s, 0.5 * s, 0.9 * s, 0.8 * s]]),
             "labels": torch.tensor([i % 3, (i + 1) % 3])}
        if masks:
            m = torch.zeros(2, s, s, dtype=torch.uint8)
            m[0, int(0.2 * s):int(0.6 * s), int(0.1 * s):int(0.5 * s)] = 1
            m[1, int(0.5 * s):int(0.8 * s), int(0.5 * s):int(0.9 * s)] = 1
            t["masks"] = m
        out.append(t)
    return out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_model(name: str, model, batch: int, repeats: int, dev: torch.device) -> dict:
    s = model.input_size
    x = torch.rand(batch, 3, s, s, device=dev)
    model.to(dev)
    is_classifier = getattr(model, "family", "") == "classifier"
    t = [{k: v.to(dev) for k, v in d.items()} for d in _targets(batch, s, getattr(model, "has_masks", False))]

    def fwd():
        with torch.no_grad():
            model(x) if is_classifier else model.dense(x)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        if is_classifier:
            loss = model(x).sum()
        else:
            loss = sum(model.loss(x, t).values())
        loss.backward()

    res = {"name": name, "input_size": s, "batch": batch,
           "parameters": sum(p.numel() for p in model.parameters())}
    for key, fn, mode in (("forward_ms_per_image", fwd, "eval"), ("fwd_bwd_ms_per_image", fwd_bwd, "train")):
        getattr(model, mode)()
        fn()  # warm-up
        _sync(dev)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times.append(time.perf_counter() - t0)
        res[key] = round(min(times) / batch * 1000, 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default=None, help="comma-separated subset")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    names = [e.name for e in zoo_entries()] + ["torchvision:fasterrcnn_resnet50_fpn@416"]
    if args.models:
        names = [n for n in names if n.split("@")[0] in args.models.split(",") or n in args.models.split(",")]
    rows = []
    for name in names:
        torch.manual_seed(0)
        if name.startswith("torchvision:"):
            builder, size = name.split("@")
            model = get_model(builder, num_classes=91, input_size=int(size))
        else:
            model = get_model(name, pretrained=False)
        rows.append(time_model(name, model, args.batch, args.repeats, dev))
        r = rows[-1]
        print(f"{r['name']:<42} {r['parameters'] / 1e6:6.2f}M params  {r['input_size']} px  "
              f"forward {r['forward_ms_per_image']:8.1f} ms/img  fwd+bwd {r['fwd_bwd_ms_per_image']:8.1f} ms/img",
              flush=True)
    out = {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch, "rows": rows}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
