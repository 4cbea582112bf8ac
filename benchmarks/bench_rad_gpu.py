"""Full default RAD (preset reference: 10 iterations, SI, eps 16) on the published-size surrogates, in
images/s, and the projected wall time of the AOCO protocol (RAD on the 5000 COCO val2017 images) on one
GPU and on 8 GPUs (``torchrun --nproc-per-node 8 -m advdet.cli.app attack ...`` shards the images, so the
projection is the one-GPU time divided by 8; issue 20, "Performance").

Models have random weights (nothing is downloaded): ``darknet:yolov3`` at 416 px and
``torchvision:retinanet_resnet50_fpn`` at 512 px; inputs are uniform noise letterboxed to the model
size. RAD's cost does not depend on the weights except through the second term and the node counts,
which are fixed (top-20 nodes, 3000 ranked boxes).

    uv run python benchmarks/bench_rad_gpu.py --device cuda --batches 8,32 --json benchmarks/results/rad_gpu.json
    # a CPU smoke run of the script itself (tiny sizes):
    uv run python benchmarks/bench_rad_gpu.py --device cpu --batches 1 --steps 1 --sizes 64,64
"""

from __future__ import annotations

import argparse
import time

import torch

from advdet.attacks.rad import RAD
from advdet.data.io import atomic_write_json
from advdet.models.hub import get_model

MODELS = ("darknet:yolov3", "torchvision:retinanet_resnet50_fpn")
AOCO_IMAGES = 5000


def measure(name: str, size: int, batch: int, steps: int, dev: torch.device) -> dict:
    torch.manual_seed(0)
    det = get_model(name, pretrained=False, input_size=size).to(dev).eval()
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dev)
    atk = RAD(det, steps=steps)
    atk(x[:1])  # warm-up (cuDNN autotuning, allocator)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    atk(x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t
    ips = batch / sec
    row = {"model": name, "input_size": size, "batch": batch, "rad_steps": steps, "device": str(dev),
           "seconds": sec, "images_per_s": ips,
           "aoco_5000_minutes_1gpu": AOCO_IMAGES / ips / 60, "aoco_5000_minutes_8gpu": AOCO_IMAGES / ips / 60 / 8,
           "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda" else None,
           "diagnostics": atk.last_state["diagnostics"].as_dict()}
    print(f"{name} {size}px batch {batch}: {ips:.2f} img/s -> AOCO 5000 images {row['aoco_5000_minutes_1gpu']:.1f} min "
          f"on 1 GPU, {row['aoco_5000_minutes_8gpu']:.1f} min on 8", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sizes", default="416,512", help="input size per model, in MODELS order")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = [measure(m, s, int(b), args.steps, dev) for m, s in zip(MODELS, sizes) for b in args.batches.split(",")]
    out = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "rows": rows}
    if args.json:
        atomic_write_json(args.json, out, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
