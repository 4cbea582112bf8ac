"""Can RobustDet's small AID learn to tell clean from adversarial images, and with which loss?
(docs/robustdet.md, "Why the AID did not learn")

    uv run python benchmarks/probe_aid.py [--runs code:1e-3:300,code:3e-2:300,paper:3e-2:300,ce:1e-2:300]
        [--cache /tmp/aid_probe_adv.pt] [--json benchmarks/results/aid_probe.json]

A fixed pool: the first 128 shapes-train images and their 5-step MTD images (eps 8, the robust recipes'
training attack) on the zoo's ssd_vgg. A fresh ``aid_small(4)`` is trained *alone* (SGD, momentum 0.9,
weight decay 5e-4, batches of 8 clean + 8 adversarial images of the first 96 pairs, the loss scaled by
beta * a = 2.25 as in eq. 5) with the triplet loss (``code``: the reference's squared-L2 form, ``paper``: the
JS form of eq. 2) or with the cross-entropy against kernel 0 (clean) / 1 (adversarial) (``ce``). Every 50
steps, on the 32 held-out pairs in eval mode: ``pi_gap`` (L1 distance of the mean softmax of clean and of
adversarial images) and the accuracy of the nearest-class-mean rule on the softmax vectors.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from advdet.data.collate import collate_detection
from advdet.data.registry import build_dataset
from advdet.models.aid import aid_small
from advdet.models.aid_triplet import aid_triplet_loss
from advdet.models.hub import get_model
from advdet.training.adversarial import AdversarialExamples

N_POOL, N_TRAIN, HALF = 128, 96, 8


def adversarial_pool(det, x, t, cache: Path | None) -> torch.Tensor:
    if cache is not None and cache.is_file():
        return torch.load(cache)
    adv = []
    for i in range(0, len(x), 16):
        xa, _, _ = AdversarialExamples("mtd", schedule="plain", steps=5)(det, x[i:i + 16], t[i:i + 16])
        adv.append(xa)
    xa = torch.cat(adv)
    if cache is not None:
        torch.save(xa, cache)
    return xa


def held_out(aid, norm, x, xa) -> tuple[float, float]:
    aid.eval()
    with torch.no_grad():
        pc, pa = aid(norm(x[N_TRAIN:])), aid(norm(xa[N_TRAIN:]))
    aid.train()
    mc, ma = pc.mean(0), pa.mean(0)
    acc = (((pc - mc).pow(2).sum(1) < (pc - ma).pow(2).sum(1)).float().mean()
           + ((pa - ma).pow(2).sum(1) < (pa - mc).pow(2).sum(1)).float().mean()) / 2
    return float((mc - ma).abs().sum()), float(acc)


def train_aid(form: str, lr: float, steps: int, norm, x, xa) -> list[dict]:
    torch.manual_seed(0)
    aid = aid_small(4)
    opt = torch.optim.SGD(aid.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    labels = [0] * HALF + [1] * HALF
    rows = []
    for s in range(steps):
        idx = torch.randperm(N_TRAIN, generator=g)[:HALF]
        batch = norm(torch.cat([x[idx], xa[idx]]))
        if form == "ce":
            loss = F.cross_entropy(aid.logits(batch), torch.tensor(labels))
        else:
            loss, _ = aid_triplet_loss(aid(batch), labels, form=form, generator=g)
        opt.zero_grad()
        (2.25 * loss).backward()
        opt.step()
        if (s + 1) % 50 == 0:
            gap, acc = held_out(aid, norm, x, xa)
            rows.append({"step": s + 1, "loss": round(loss.item(), 4), "pi_gap": round(gap, 4), "acc": round(acc, 3)})
            print(f"{form} lr={lr} step {s + 1}: loss {loss.item():.4f} held-out pi_gap {gap:.4f} acc {acc:.3f}",
                  flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="code:1e-3:300,code:3e-2:300,paper:3e-2:300,ce:1e-2:300",
                    help="FORM:LR:STEPS,... with FORM code | paper | ce")
    ap.add_argument("--cache", type=Path, default=None, help="file for the crafted adversarial pool")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = build_dataset("shapes-train", size=256)
    x, t = collate_detection([ds[i] for i in range(N_POOL)])
    det = get_model("ssd_vgg", pretrained=True).eval()
    t0 = time.perf_counter()
    xa = adversarial_pool(det, x, t, args.cache)
    print(f"adversarial pool: {time.perf_counter() - t0:.0f} s", flush=True)
    out = []
    for spec in args.runs.split(","):
        form, lr, steps = spec.split(":")
        if form not in ("code", "paper", "ce"):
            raise SystemExit(f"--runs: unknown form {form!r} in {spec!r}; use code, paper or ce")
        out.append({"form": form, "lr": float(lr), "steps": int(steps),
                    "log": train_aid(form, float(lr), int(steps), det.normalize, x, xa)})
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "runs": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
