"""Where do white-box attacks on the zoo's RobustDet send its AID? (docs/robustdet.md, README Table 1)

    uv run python benchmarks/probe_aid_adaptive.py [--limit 32] [--attacks cls,loc,cwa] [--threads 1]
        [--json benchmarks/results/aid_adaptive.json]

For the first ``limit`` shapes-val images: the mean AID softmax ``pi`` of the clean images and of their
Table 1 adversarial images (eps 8, step 8, 20 steps, adaptive: the gradient runs through the AID), and the
share of images whose ``pi`` puts the most weight on kernel 1, the kernel that training assigns to
adversarial images (``aid_ce``: clean -> kernel 0, adversarial -> kernel 1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from advdet.bench.robustness_columns import attack_targets, build_table_attack
from advdet.data.collate import collate_detection
from advdet.data.registry import build_dataset
from advdet.models.hub import get_model


def summary(pi: torch.Tensor) -> dict:
    return {"mean_pi": [round(v, 4) for v in pi.mean(0).tolist()],
            "share_kernel1_argmax": round(float((pi.argmax(1) == 1).float().mean()), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--attacks", default="cls,loc,cwa")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    det = get_model("robustdet", pretrained=True).eval()
    ds = build_dataset("shapes-val", size=det.input_size)
    x, t = collate_detection([ds[i] for i in range(args.limit)])
    gt = attack_targets(t, x.device)
    with torch.no_grad():
        out = {"images": args.limit, "clean": summary(det.aid_probs(x))}
    print("clean", out["clean"], flush=True)
    for name in args.attacks.split(","):
        xa = torch.cat([build_table_attack(name, det)(x[i:i + 8], gt[i:i + 8]) for i in range(0, len(x), 8)])
        with torch.no_grad():
            out[name] = summary(det.aid_probs(xa))
        print(name, out[name], flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
