"""RAD's presets and each element of the reference code, measured (issue 20; the table of docs/rad.md).

For each configuration RAD crafts adversarial images on the zoo ``yolov3`` for the first ``--limit``
shapes-val images (eps 16, step 2, 10 iterations, SI; images rounded to uint8) and every zoo detector is
evaluated on them (``advdet.bench.transfer.transfer_matrix``): the white-box mAP50 of yolov3, the mean
black-box mAP50 of the other detectors with its 95 % bootstrap interval over images, and RAD's
diagnostics (share of gradient evaluations driven by the second term alone, mean |delta|, share of
values at +-eps, relevance per iteration).

Configurations: ``reference`` (default preset, the authors' code), ``paper`` (eq. 2-5), and the
reference with one element switched to the paper's / advdet's former choice:

- ``ref-head-eq2``: the head of eq. 2 instead of the code's A - B sum(A)/sum(B) (``variant="paper"``);
- ``ref-no-second-term``: the mean positive relevance alone (``loss="positive"``);
- ``ref-renormalised-si``: the SI average normalised again (``update="mean_abs"``, advdet <= 0.x);
- ``ref-zero-padding``: zero letterbox padding in the surrogate's input (``pad_value=None``).

Each configuration writes ``OUT/<name>.json`` and is skipped when that file exists (resumable);
``--table`` prints the markdown table from the files present.

    uv run python benchmarks/rad_presets.py --limit 64 --out benchmarks/results/rad_presets --threads 1
    uv run python benchmarks/rad_presets.py --out benchmarks/results/rad_presets --table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

CONFIGS: dict[str, dict] = {
    "reference": {},
    "paper": {"preset": "paper"},
    "ref-head-eq2": {"variant": "paper"},
    "ref-no-second-term": {"loss": "positive"},
    "ref-renormalised-si": {"update": "mean_abs"},
    "ref-zero-padding": {"pad_value": None},
}
VICTIMS = ["yolov3", "ssd_vgg", "retinanet", "fcos", "fasterrcnn", "maskrcnn"]


def _micro_batch(args) -> dict:
    """RAD's ``micro_batch`` from ``--micro-batch`` (``auto`` leaves RAD's default); it changes memory and
    speed, not the images."""
    mb = args.micro_batch
    return {} if mb == "auto" else {"micro_batch": None if mb == "none" else int(mb)}


def run(name: str, args) -> Path:
    from advdet.bench.transfer import transfer_matrix
    from advdet.bench.transfer_report import json_ready

    path = Path(args.out) / f"{name}.json"
    if path.exists():
        print(f"{name}: {path} exists, skipped", flush=True)
        return path
    t0 = time.perf_counter()
    res = transfer_matrix(["yolov3"], ["rad"], VICTIMS, "shapes-val", limit=args.limit, batch_size=args.batch,
                          attack_kwargs={"rad": {**CONFIGS[name], **_micro_batch(args)}}, relevance=False, examples=0, progress=False,
                          n_boot=args.n_boot, on_progress=lambda m: print(f"  {name}: {m}", flush=True))
    out = json_ready(res)
    out["config"] = {"name": name, "rad_kwargs": {**CONFIGS[name], **_micro_batch(args)},
                     "wall_s": round(time.perf_counter() - t0, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"{name}: wrote {path} ({out['config']['wall_s']} s)", flush=True)
    return path


def _ci(cell: dict | None, signed: bool = False) -> str:
    """'value [lo, hi]' x100 of a bootstrap cell ({value, lo, hi})."""
    if not cell:
        return "-"
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"{f.format(100 * cell['value'])} [{f.format(100 * cell['lo'])}, {f.format(100 * cell['hi'])}]"


def _black_box_cells(boot: dict | None, label: str) -> tuple[dict | None, dict | None]:
    """(the black-box mean's interval of row ``label``, the paired interval of that row minus the
    Gaussian ablation) from a ``transfer_matrix`` bootstrap block."""
    if not boot:
        return None, None
    row = next((r["black_box"] for r in boot["rows"] if r["label"] == label), None)
    pair = next((p["black_box"] for p in boot["paired"] if p["row"] == label and p["baseline"] == "Ablation"), None)
    return row, pair


def table(args) -> str:
    lines = ["| configuration | RAD kwargs | white-box mAP50 yolov3 | black-box mean mAP50 [95 % CI] | "
             "RAD - Gaussian, black-box [95 % CI] | second-term share | mean abs delta | share at eps | images | "
             "wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    clean = gauss = None
    for name in CONFIGS:
        path = Path(args.out) / f"{name}.json"
        if not path.exists():
            lines.append(f"| {name} | `{CONFIGS[name]}` | (not run) | | | | | | | |")
            continue
        res = json.loads(path.read_text())
        rows = res["rows"]
        clean = clean or rows[0]
        gauss = gauss or next((r for r in rows if r["attack"] == "gaussian"), None)
        row = next(r for r in rows if r["attack"] == "rad")
        d = row.get("diagnostics") or {}
        share = d.get("second_term_share")
        bb, diff = _black_box_cells(res.get("bootstrap"), row["label"])
        lines.append(
            f"| {name} | `{CONFIGS[name]}` | {100 * row['white_box']['map50']:.1f} | {_ci(bb)} | {_ci(diff, True)} | "
            f"{'-' if share is None else f'{100 * share:.0f} %'} | {d.get('mean_abs_delta', float('nan')):.2f} | "
            f"{100 * d.get('share_at_eps', float('nan')):.1f} % | {res['images']} | {res['config']['wall_s']:.0f} |")
    if clean is not None:
        bb = [v for v in clean["metrics"] if v != "yolov3"]
        cm = sum(clean["metrics"][v]["map50"] for v in bb) / len(bb)
        lines.append(f"| no attack | | {100 * clean['metrics']['yolov3']['map50']:.1f} | {100 * cm:.1f} | | | | | | |")
    if gauss is not None:
        gm = sum(gauss["metrics"][v]["map50"] for v in bb) / len(bb)
        lines.append(f"| Gaussian ablation | | {100 * gauss['metrics']['yolov3']['map50']:.1f} | {100 * gm:.1f} | "
                     f"| | | | | |")
    models = {}
    for name in CONFIGS:
        path = Path(args.out) / f"{name}.json"
        if path.exists():
            for m, info in json.loads(path.read_text())["models"].items():
                models.setdefault(m, set()).add(info.get("weights_sha256"))
    if models:
        lines += ["", "Weights (sha256) of every file in this table: " + "; ".join(
            f"{m} `{', '.join(sorted(str(h) for h in hs))}`" for m, hs in models.items())]
        if any(len(hs) > 1 for hs in models.values()):
            lines.append("**warning: the files above were made with different weights of one model**")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma list, in this order")
    ap.add_argument("--out", default="benchmarks/results/rad_presets")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--micro-batch", default="auto", help="RAD micro_batch: auto, none or an int")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the files in --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.table:
        print(table(args))
        return
    for name in [c for c in args.configs.split(",") if c]:
        if name not in CONFIGS:
            raise SystemExit(f"rad_presets: unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
        run(name, args)
    print(table(args))


if __name__ == "__main__":
    main()
