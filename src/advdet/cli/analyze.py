"""`advdet analyze loss-change | entanglement | confidence`: the analyses of RobustDet section 3.2 (Fig. 3,
Fig. 4) and the confidence distribution of Fig. 7c; each writes NAME.png and NAME.json into --out.
`advdet analyze relevance-similarity`: RAD's premise (Fig. 1), the correlation of the relevance maps of
every pair of detectors; writes relevance_similarity.json and one PNG per map kind into --out."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import typer
from rich.table import Table

from advdet.cli.app import analyze_app, console, resolve_device
from advdet.cli.options import SPEC_HELP, AllowUntrained, Device, WeightsFile, WeightsMap

_MODEL = typer.Option(..., help="Zoo name (e.g. ssd_vgg-mtd, robustdet) or torchvision:BUILDER.")
_DATA = typer.Option("shapes-val", help="shapes-val, a COCO-format folder (with --ann) or a VOC folder.")
_ANN = typer.Option(None, help="COCO instances JSON for an images folder.")
_LIMIT = typer.Option(16, help="Use the first N images.")
_BATCH = typer.Option(4, help="Images per batch (loss-change: the probe and measured batch size).")
_EPS = typer.Option(8.0, help="Linf budget of the attack, 0-255 units (step = eps).")
_STEPS = typer.Option(None, help="Attack iterations (default: the attack's, 20 for PGD/MTD).")
_SEED = typer.Option(0, help="Attack seed.")
_OUT = typer.Option(..., help="Output folder for NAME.png and NAME.json.")


def _run(fn: Callable, **kw) -> dict:
    return fn(**kw)  # user errors: one line from the CLI's handler (cli/app.py)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:+.4g}" if isinstance(v, float) else str(v)


def _print_result(res: dict, title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """The result table (first column left-aligned, the others right) and where the files went."""
    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, justify="right" if i else "left")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"wrote {res['png']} and {res['json']}")


@analyze_app.command("loss-change")
def loss_change_cmd(model: str = _MODEL, weights: WeightsFile = None, data: str = _DATA,
                    ann: Optional[Path] = _ANN, limit: int = _LIMIT, batch_size: int = _BATCH,
                    attack: str = typer.Option("mtd", help=f"Attack crafting the adversarial images: {SPEC_HELP}."),
                    eps: float = _EPS, steps: Optional[int] = _STEPS,
                    lr: float = typer.Option(1e-3, help="SGD learning rate of the probe step."),
                    probe_steps: int = typer.Option(1, help="SGD steps of the probe update (the paper's m)."),
                    bins: int = typer.Option(30, help="Histogram bins."), seed: int = _SEED, out: Path = _OUT,
                    device: Device = None, allow_untrained: AllowUntrained = False) -> None:
    """Fig. 3: per-image loss change on one batch after an SGD step on another batch (clean or adversarial)."""
    from advdet.bench.analyses import run_loss_change

    res = _run(run_loss_change, model=model, data=data, out_dir=out, weights=weights, ann=ann, limit=limit,
               batch_size=batch_size, attack=attack, eps=eps, steps=steps, lr=lr, probe_steps=probe_steps,
               bins=bins, seed=seed, device=resolve_device(device), allow_untrained=allow_untrained)
    _print_result(res, f"{model}: loss change ({res['images']} images, {attack} eps {eps:g}, lr {lr:g})",
                  ("pair", "mean", "median", "> 0"),
                  [(p.replace("->", " → "), _fmt(d["mean"]), _fmt(d["median"]),
                    "-" if d["frac_positive"] is None else f"{100 * d['frac_positive']:.0f}%")
                   for p, d in res["pairs"].items()])


@analyze_app.command("entanglement")
def entanglement_cmd(model: str = _MODEL, weights: WeightsFile = None, data: str = _DATA,
                     ann: Optional[Path] = _ANN, limit: int = _LIMIT, batch_size: int = _BATCH,
                     attack: str = typer.Option("mtd", help=f"Attack crafting the adversarial images: {SPEC_HELP}."),
                     eps: float = _EPS, steps: Optional[int] = _STEPS, seed: int = _SEED, out: Path = _OUT,
                     device: Device = None, allow_untrained: AllowUntrained = False) -> None:
    """Fig. 4: per-layer gradient entanglement R = g_clean . g_adv / |g_adv|^2."""
    from advdet.bench.analyses import run_entanglement

    res = _run(run_entanglement, model=model, data=data, out_dir=out, weights=weights, ann=ann, limit=limit,
               batch_size=batch_size, attack=attack, eps=eps, steps=steps, seed=seed, device=resolve_device(device),
               allow_untrained=allow_untrained)
    _print_result(res, f"{model}: gradient entanglement R per layer ({res['images']} images, {attack} eps {eps:g})",
                  ("layer", "params", "R (summed)", "R median"),
                  [(name, str(n), _fmt(r), _fmt(med))
                   for name, n, r, med in zip(res["layers"], res["num_params"], res["r_dataset"], res["r_median"])])


@analyze_app.command("confidence")
def confidence_cmd(model: str = _MODEL, weights: WeightsFile = None, data: str = _DATA,
                   ann: Optional[Path] = _ANN, limit: int = _LIMIT, batch_size: int = _BATCH,
                   attacks: str = typer.Option("cls,loc", help=f"Comma list of attacks besides clean; each {SPEC_HELP}."),
                   eps: float = _EPS, steps: Optional[int] = _STEPS,
                   thresh: float = typer.Option(0.3, help="Keep detections with confidence >= this (paper: 0.3)."),
                   bins: int = typer.Option(14, help="Histogram bins between thresh and 1."), seed: int = _SEED,
                   out: Path = _OUT, device: Device = None, allow_untrained: AllowUntrained = False) -> None:
    """Fig. 7c: distribution of detection confidences on clean, A_cls and A_loc images."""
    from advdet.bench.analyses import run_confidence
    from advdet.bench.robustness_columns import attack_label

    from advdet.attacks.spec import parse_attack_list

    attack_list = [str(s) for s in parse_attack_list(attacks, extra_names=("clean",))]  # one line on a bad spec
    res = _run(run_confidence, model=model, data=data, out_dir=out, weights=weights, ann=ann, limit=limit,
               batch_size=batch_size, attacks=attack_list, eps=eps, steps=steps, thresh=thresh, bins=bins, seed=seed,
               device=resolve_device(device), allow_untrained=allow_untrained)
    _print_result(res, f"{model}: detection confidences >= {thresh:g} ({res['images']} images)",
                  ("condition", "detections", "mean", "median"),
                  [(attack_label(k), str(d["n"]), "-" if d["mean"] is None else f"{d['mean']:.3f}",
                    "-" if d["median"] is None else f"{d['median']:.3f}")
                   for k, d in res["conditions"].items()])


@analyze_app.command("relevance-similarity")
def relevance_similarity_cmd(
        models: str = typer.Option(..., help="Comma list of at least 2 detectors: zoo names (e.g. "
                                             "yolov3,ssd_vgg,fcos) or torchvision:BUILDER."),
        weights: WeightsMap = [],
        data: str = _DATA, ann: Optional[Path] = _ANN, limit: int = _LIMIT,
        batch_size: int = typer.Option(4, help="Images per batch (per model)."),
        top: int = typer.Option(20, help="Target nodes T per image: each model's top-m cls nodes (RAD's m)."),
        variant: str = typer.Option("paper", help="SGLRP head: paper (eq. 2) or rad_code (RAD's released code)."),
        gradient: str = typer.Option("abs", help="Baseline input-gradient map: abs (sum over RGB of |grad|) or "
                                                 "signed (sum over RGB of grad)."),
        out: Path = _OUT, device: Device = None, allow_untrained: AllowUntrained = False) -> None:
    """RAD Fig. 1: Spearman and cosine correlation of the multi-node SGLRP maps (and of input-gradient maps,
    the baseline) between every pair of detectors on clean images, on the original image grid."""
    from advdet.bench.relevance_similarity import KINDS, run_relevance_similarity
    from advdet.cli.bench_robustness import parse_weights, split_list

    model_list = split_list(models, "models")
    res = _run(run_relevance_similarity, models=model_list, data=data, out_dir=out,
               weights=parse_weights(weights, model_list), ann=ann, limit=limit, batch_size=batch_size, top=top,
               variant=variant, gradient=gradient, device=resolve_device(device), allow_untrained=allow_untrained)
    names = res["models"]
    for kind in KINDS:
        k = res["kinds"][kind]
        table = Table(title=f"{'multi-node SGLRP' if kind == 'sglrp' else 'input-gradient'} maps: Spearman / "
                            f"cosine, mean over {res['images']} images")
        table.add_column("model")
        for name in names:
            table.add_column(name, justify="right")
        for i, name in enumerate(names):
            table.add_row(name, *(f"{_corr(k['spearman'][i][j])} / {_corr(k['cosine'][i][j])}"
                                  for j in range(len(names))))
        console.print(table)
    console.print(f"wrote {', '.join(res['pngs'].values())} and {res['json']}", markup=False, highlight=False,
                  soft_wrap=True)


def _corr(v) -> str:
    return "-" if v is None else f"{v:.3f}"
