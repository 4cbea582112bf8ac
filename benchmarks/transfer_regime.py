"""The transfer regime of the embedded benchmark (issue 21): does an attack crafted on one zoo detector (or
on an ensemble of all but one) hurt the others, and how far is that from RAD's Table 3?

    uv run --frozen python benchmarks/transfer_regime.py --images 64 --threads 1 \
        --out benchmarks/results/transfer_regime.json

Rows, on the first ``--images`` shapes-val images (eps 16 in 0-255 units, images rounded to uint8 before
evaluation, attackers see no ground truth):

- ``Ablation``: Gaussian noise, sigma 9 (RAD's ablation);
- per surrogate (every model of ``--surrogates``, default all of ``--models``) and attack of ``--attacks``
  (default ``dfool``, ``dag-eps``, ``rad``, ``pgd``): the attack crafted on that surrogate; ``pgd`` is
  sign-PGD on the surrogate's summed detection losses with step 2 and 10 steps (as ``ens-pgd``);
- leave-one-out ensembles (unless ``--no-ensembles``): for every model ``h`` (or those of
  ``--held-out``), ``ens-pgd`` (sign-PGD on the summed losses of all the other models, each member's
  gradient L1-normalised per image) crafted on ``loo-h``, the ensemble of the others; ``h`` is its
  held-out victim.

Victims: every model of ``--models`` (default the six zoo detectors). Cells: box mAP50 and its relative
drop ``1 - adv / clean``. The crafting and evaluation are ``advdet.bench.transfer.transfer_matrix``'s.

The summary checks the goals of issue 21 item 4 (RAD Table 3's regime): the ablation costs the black-box
victims 10-20 %; each output attack from ``--reference`` (default yolov3) costs them 20-40 % and at least
twice the ablation; every leave-one-out ensemble costs its held-out model at least 40 %.
JSON: the settings, the command, the weights (sha256) of every model, per row the mAP50 per victim, the
summary tables and the goals with their measured values.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

DEFAULT_MODELS = ("yolov3", "ssd_vgg", "retinanet", "fcos", "fasterrcnn", "maskrcnn")
DEFAULT_ATTACKS = ("dfool", "dag-eps", "rad", "pgd")
#: sign-PGD on the detection losses with RAD's budget (the issue's measurement), for one surrogate and ensembles
PGD_KWARGS = {"step": 2.0, "steps": 10, "update": "sign"}


def _transfer(**kw) -> dict:
    from advdet.bench.transfer import transfer_matrix

    return transfer_matrix(**kw)


def _drop(clean: float | None, adv: float | None) -> float | None:
    if clean is None or adv is None or clean <= 0:
        return None
    return 1.0 - adv / clean


def _mean(vals) -> float | None:
    v = [x for x in vals if x is not None]
    return sum(v) / len(v) if v else None


def drop_interval(result: dict, row: int, victims: list[str], level: float = 0.95) -> dict | None:
    """Percentile bootstrap interval of the mean relative drop ``mean_v (1 - adv_v / clean_v)`` of ``row``
    over ``victims``: each resample of the images (``transfer_matrix``'s ``_bootstrap_samples``, the same
    resamples for every cell) gives the clean row's (row 0) and ``row``'s mAP50 per victim, so the ratio is
    paired. None without samples."""
    import numpy as np

    from advdet.metrics.bootstrap import percentile_interval

    cells = (result.get("_bootstrap_samples") or {}).get("cells")
    if not cells or not victims:
        return None
    drops = []
    for v in victims:
        clean = np.asarray(cells[(0, v)], dtype=np.float64)
        adv = np.asarray(cells[(row, v)], dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            drops.append(np.where(clean > 0, 1.0 - adv / clean, np.nan))
    stack = np.vstack(drops)
    n = (~np.isnan(stack)).sum(axis=0)
    mean = np.where(n > 0, np.nansum(stack, axis=0) / np.maximum(n, 1), np.nan)
    lo, hi = percentile_interval(mean, level)
    return {"lo": None if lo is None or np.isnan(lo) else float(lo),
            "hi": None if hi is None or np.isnan(hi) else float(hi)}


def run(models: list[str], surrogates: list[str], attacks: list[str], *, images: int, eps: float,
        ensembles: bool, batch_size: int, seed: int, weights: dict[str, str], device: str | None,
        data: str = "shapes-val", pgd_steps: int = 10, n_boot: int = 1000,
        held_out: list[str] | None = None) -> dict:
    from advdet.attacks.ensemble import SurrogateEnsemble
    from advdet.bench.loading import load_model

    t0 = time.perf_counter()
    loaded = {m: load_model(m, weights=weights.get(m), device=device) for m in models}
    given = {m: lm.model for m, lm in loaded.items()}
    pgd = dict(PGD_KWARGS, steps=pgd_steps)
    common = dict(victims=list(models), data=data, limit=images, eps=eps, batch_size=batch_size, seed=seed,
                  device=device, progress=False, examples=0, relevance=False, models=given, n_boot=n_boot,
                  boot_seed=0)
    logging.info("single surrogates: %s x %s on %d images", surrogates, attacks, images)
    single = _transfer(surrogates=list(surrogates), attacks=["gaussian", *attacks],
                       attack_kwargs={"pgd": dict(pgd)}, **common)
    ens_result = None
    unknown = sorted(set(held_out or []) - set(models))
    if unknown:
        raise ValueError(f"--held-out names models that are not victims: {unknown}")
    if ensembles and len(models) > 2:
        ens = {f"loo-{h}": SurrogateEnsemble([given[m] for m in models if m != h], [m for m in models if m != h])
               for h in (held_out or models)}
        logging.info("leave-one-out ensembles: %s", list(ens))
        ens_result = _transfer(surrogates=list(ens), attacks=["ens-pgd"], attack_kwargs={"ens-pgd": dict(pgd)},
                               **{**common, "models": {**given, **ens}})
    return {"single": single, "ensembles": ens_result, "seconds": round(time.perf_counter() - t0, 1),
            "sha256": {m: lm.weights_sha256 for m, lm in loaded.items()}}


def summarise(res: dict, models: list[str], reference: str) -> dict:
    """mAP50 tables, relative drops, and the goals of issue 21 item 4 with their measured values."""
    single = res["single"]
    rows = single["rows"]
    clean = {v: rows[0]["metrics"][v]["map50"] for v in models}

    def row_map50(r: dict) -> dict:
        return {v: r["metrics"][v]["map50"] for v in models}

    table = []  # one line per row: label, attack, surrogate, mAP50 per victim, drop per victim, black-box mean drop
    for ri, r in enumerate(rows):
        m = row_map50(r)
        drops = {v: _drop(clean[v], m[v]) for v in models}
        black = [v for v in models if v != r["surrogate"]]
        table.append({"label": r["label"], "attack": r["attack"] or "none", "surrogate": r["surrogate"], "map50": m,
                      "drop": drops, "black_box_drop": _mean(drops[v] for v in black),
                      "black_box_drop_ci": drop_interval(single, ri, black), "seconds": r.get("seconds")})
    ablation = next(t for t in table if t["attack"] == "gaussian")
    ref_black = [v for v in models if v != reference]
    ablation_ref = _mean(ablation["drop"][v] for v in ref_black)
    ablation_ci = drop_interval(single, table.index(ablation), ref_black)
    goals: dict = {"ablation_black_box_drop": {"measured": ablation_ref, "interval": ablation_ci, "goal": "0.10-0.20",
                                               "met": ablation_ref is not None and 0.10 <= ablation_ref <= 0.20}}
    outputs = {}
    for t in table:
        if t["surrogate"] == reference and t["attack"] not in ("gaussian", "none"):
            d = t["black_box_drop"]
            outputs[t["attack"]] = {"measured": d, "interval": t["black_box_drop_ci"],
                                    "goal": "0.20-0.40 and >= 2 x ablation",
                                    "met": d is not None and ablation_ref is not None and 0.20 <= d <= 0.40
                                    and d >= 2 * ablation_ref}
    goals[f"output_attacks_from_{reference}"] = outputs
    loo = {}
    if res.get("ensembles"):
        for ri, r in enumerate(res["ensembles"]["rows"]):
            if r["attack"] != "ens-pgd":
                continue
            held = r["surrogate"].removeprefix("loo-")
            d = _drop(clean[held], r["metrics"][held]["map50"])
            ci = drop_interval(res["ensembles"], ri, [held])
            table.append({"label": f"ens-pgd (all but {held})", "attack": "ens-pgd", "surrogate": r["surrogate"],
                          "map50": row_map50(r), "drop": {v: _drop(clean[v], row_map50(r)[v]) for v in models},
                          "black_box_drop": d, "black_box_drop_ci": ci, "seconds": r.get("seconds")})
            loo[held] = {"measured": d, "interval": ci, "goal": ">= 0.40", "met": d is not None and d >= 0.40}
        goals["leave_one_out_held_out_drop"] = loo
    return {"clean_map50": clean, "rows": table, "goals": goals}


def markdown(summary: dict, models: list[str]) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    lines = ["| row | " + " | ".join(models) + " | black-box drop % |", "|---|" + "---:|" * (len(models) + 1)]
    lines.append("| clean mAP50 | " + " | ".join(pct(summary["clean_map50"][v]) for v in models) + " | |")
    for t in summary["rows"]:
        if t["attack"] == "none":
            continue
        cells = [pct(t["map50"][v]) + ("*" if v == t["surrogate"] else "") for v in models]
        ci = t.get("black_box_drop_ci")
        bb = pct(t["black_box_drop"])
        if ci and ci.get("lo") is not None:
            bb += f" [{pct(ci['lo'])}, {pct(ci['hi'])}]"
        lines.append(f"| {t['label']} | " + " | ".join(cells) + f" | {bb} |")
    lines.append("")
    lines.append("mAP50 x100; * white-box (the row's surrogate); black-box drop: mean of 1 - adv/clean over the "
                 "victims other than the surrogate (ensembles: the held-out model), with its 95 % percentile "
                 "bootstrap interval over the images (paired with the clean row on each resample)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="victims (and default surrogates)")
    ap.add_argument("--surrogates", default=None, help="single-model surrogates (default: every model)")
    ap.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS), help="attacks per surrogate (the Gaussian "
                    "ablation is always run)")
    ap.add_argument("--no-ensembles", action="store_true", help="skip the leave-one-out ensembles")
    ap.add_argument("--held-out", default=None, help="leave-one-out ensembles only for these held-out models "
                    "(comma list; default: every model)")
    ap.add_argument("--images", type=int, default=64, help="the first N images")
    ap.add_argument("--data", default="shapes-val", help="shapes-val or a COCO-format folder")
    ap.add_argument("--pgd-steps", type=int, default=10, help="steps of pgd and ens-pgd (step 2)")
    ap.add_argument("--eps", type=float, default=16.0)
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the images (0: no intervals)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference", default="yolov3", help="the surrogate of the goals' output attacks")
    ap.add_argument("--weights", action="append", default=[], help="NAME=PATH: weights instead of the zoo's")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="write the JSON here (and the table next to it as .md)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    surrogates = [m for m in (args.surrogates or args.models).split(",") if m]
    attacks = [a for a in args.attacks.split(",") if a and a != "gaussian"]
    weights = dict(w.split("=", 1) for w in args.weights)
    held_out = [m for m in args.held_out.split(",") if m] if args.held_out else None
    res = run(models, surrogates, attacks, images=args.images, eps=args.eps, ensembles=not args.no_ensembles,
              batch_size=args.batch_size, seed=args.seed, weights=weights, device=args.device, data=args.data,
              pgd_steps=args.pgd_steps, n_boot=args.n_boot, held_out=held_out)
    summary = summarise(res, models, args.reference)
    table = markdown(summary, models)
    print(table)
    print(json.dumps(summary["goals"], indent=2))
    if args.out:
        from advdet.bench.transfer_report import json_ready

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"command": "uv run --frozen python benchmarks/transfer_regime.py " + " ".join(sys.argv[1:] if argv is None
                                                                                              else argv),
               "settings": {"models": models, "surrogates": surrogates, "attacks": attacks, "images": args.images,
                            "data": args.data, "eps": args.eps, "seed": args.seed,
                            "pgd": dict(PGD_KWARGS, steps=args.pgd_steps), "ensembles": not args.no_ensembles,
                            "held_out": held_out or (models if not args.no_ensembles else []),
                            "reference": args.reference, "n_boot": args.n_boot,
                            "threads": torch.get_num_threads()},
               "weights_sha256": res["sha256"], "seconds": res["seconds"], **summary,
               "raw": {"single": json_ready(res["single"]),
                       "ensembles": json_ready(res["ensembles"]) if res["ensembles"] else None}}
        out.write_text(json.dumps(doc, indent=1))
        out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
