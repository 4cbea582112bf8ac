"""`advdet attack`: craft an adversarial COCO-format dataset with one attack on one surrogate model;
`advdet attack --list`: the registered attacks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from advdet.cli.app import app, console
from advdet.cli.options import (AllowUntrained, AttackSpecOption, Device, SettingsOption, WeightsFile, attack_spec,
                                budget_flags)
from advdet.data.errors import AdvdetError

log = logging.getLogger(__name__)


def print_attack_list() -> None:
    from advdet.bench.craft_job import load_attack_registry

    table = Table(title="advdet attacks (advdet attack --attack NAME[:KEY=VALUE,...], "
                        "e.g. rad:steps=5,technique=SI+MI)")
    table.add_column("name", style="bold")
    table.add_column("surrogate")
    table.add_column("budget")
    table.add_column("description")
    for name, cls in load_attack_registry().items():
        table.add_row(name, cls.surrogate_kind, cls.budget, cls.description)
    console.print(table)


def print_card_summary(card: dict, out: Path, title: str | None = None) -> None:
    """One table: images, skipped, RMSE, Linf, time and where the output is."""
    run = card.get("run", {})
    table = Table(title=title or f"{card['attack']['name']} on {card['surrogate']['name']}")
    table.add_column("")
    table.add_column("value", justify="right")

    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    eps = card["attack"].get("eps")
    table.add_row("images", str(card["images"]))
    table.add_row("skipped", str(card["num_skipped"]))
    table.add_row("eps (0-255)", f(eps, "{:g}"))
    table.add_row("RMSE mean / max", f"{f(card['rmse_mean'])} / {f(card['rmse_max'])}")
    table.add_row("Linf max", f(card["linf_max"], "{:g}"))
    table.add_row("targets", str(card.get("targets")))
    table.add_row("time (s)", f(run.get("seconds"), "{:.1f}"))
    table.add_row("images/s", f(run.get("images_per_s"), "{:.3g}"))
    console.print(table)
    console.print(f"output: {out}", soft_wrap=True, highlight=False, markup=False)
    for verb, items in (("skipped", card.get("skipped", [])), ("dropped", card.get("dropped", [])),
                        ("converted", card.get("converted", []))):
        for s in items[:10]:  # markup off: "bbox [nan, 1, 2, 3]" is text, not a rich tag
            console.print(f"  {verb} {s['item']}: {s['problem']}", markup=False, highlight=False, soft_wrap=True)
        if len(items) > 10:
            console.print(f"  ... and {len(items) - 10} more {verb} (see card.json)", highlight=False)


def print_evaluation(evaluation: dict, title: str) -> None:
    table = Table(title=title)
    for col in ("victim", "images", "clean mAP", "adv mAP", "clean mAP50", "adv mAP50", "segm clean", "segm adv"):
        table.add_column(col, justify="left" if col == "victim" else "right")
    for name, ev in evaluation.items():
        c, a = ev["clean"], ev["adversarial"]
        seg = ("-", "-") if "segm_map" not in c else (f"{c['segm_map']:.3f}", f"{a['segm_map']:.3f}")
        table.add_row(name + (" (white-box)" if ev.get("white_box") else ""), str(ev["images"]),
                      f"{c['map']:.3f}", f"{a['map']:.3f}", f"{c['map50']:.3f}", f"{a['map50']:.3f}", *seg)
    console.print(table)


@app.command("attack")
def attack_cmd(
        attack: AttackSpecOption = None,
        model: Optional[str] = typer.Option(None, "--model", "--surrogate",
                                            help="Surrogate: zoo name, torchvision:BUILDER, darknet:yolov3, "
                                            "ultralytics:YAML|FILE.pt or hf:CONFIG|DIR (default for "
                                            "classifier attacks: classifier); a+b+c is one ensemble that "
                                            "averages the attack over its members (ATTACK:weights=loss|"
                                            "equal|[w,...],normalize=false)."),
        data: str = typer.Option("shapes-val", help="shapes-train, shapes-val, or an images folder (with --ann)."),
        out: Optional[Path] = typer.Option(None, help="Output folder (COCO format: images/, instances.json, "
                                           "card.json)."),
        ann: Optional[Path] = typer.Option(None, help="COCO instances JSON for an images folder."),
        weights: WeightsFile = None,
        eps: Optional[float] = typer.Option(None, help="Linf budget, 0-255 units (default: the attack's)."),
        step: Optional[float] = typer.Option(None, help="Step size, 0-255 units (default: the attack's)."),
        steps: Optional[int] = typer.Option(None, help="Iterations (default: the attack's)."),
        limit: Optional[int] = typer.Option(None, help="Attack the first N images only."),
        batch_size: int = typer.Option(8, help="Images per attack call (part of the job: fixes batches and seeds)."),
        seed: int = typer.Option(0, help="Seed: the same seed gives byte-identical files."),
        skip_bad: bool = typer.Option(False, help="Skip and count bad images instead of failing."),
        device: Device = None,
        set_: SettingsOption = [],
        labels: bool = typer.Option(True, help="Attack with the ground-truth boxes (loss-based attacks); "
                                    "--no-labels: with the surrogate's clean predictions."),
        evaluate: bool = typer.Option(False, help="Also report the surrogate's clean vs adversarial mAP."),
        workers: int = typer.Option(0, help="DataLoader workers decoding images."),
        size: Optional[int] = typer.Option(None, help="Letterbox size of an external (torchvision:, ultralytics:, "
                                           "hf:) surrogate (default: the builder's own)."),
        list_: bool = typer.Option(False, "--list", help="List the registered attacks and exit."),
        untrained: AllowUntrained = False,
) -> None:
    """Attack every image of a dataset and write the adversarial dataset in COCO format (resumable)."""
    if list_:
        print_attack_list()
        return
    if not attack or out is None:
        raise AdvdetError("--attack and --out are required (or --list)")
    from advdet.bench.craft import craft_dataset
    from advdet.bench.craft_job import load_attack_registry
    from advdet.bench.distributed import init_distributed, shutdown_distributed

    # one line naming the attack and the bad key or value; --eps/--step/--steps are sugar for its keys
    spec = budget_flags(attack_spec(attack, set_), eps=eps, step=step, steps=steps)
    if model is None:
        if load_attack_registry()[spec.name].surrogate_kind != "classifier":
            raise AdvdetError(f"--model is required for the detector attack {spec.name!r}")
        model = "classifier"
    try:
        kw = dict(spec.kwargs)
        rank, world, dev = init_distributed(device)
        card = craft_dataset(spec.name, model, data, out, ann=ann, weights=weights,
                             attack_kwargs=kw, limit=limit, batch_size=batch_size, seed=seed, skip_bad=skip_bad,
                             device=dev, pretrained=not untrained, labels=labels, workers=workers,
                             input_size=size)
        if rank != 0:
            return
        print_card_summary(card, out)
        if evaluate:
            if card["surrogate"]["kind"] != "detector":
                console.print("--evaluate: the surrogate is a classifier; no detection mAP to report")
            else:
                from advdet.bench.aoco import evaluate_split

                names = model.split("+")  # an ensemble: each member, white-box
                ev = evaluate_split(out, [(m, str(weights) if weights else None) for m in names],
                                    batch_size=batch_size, device=str(dev) if dev else None,
                                    pretrained=not untrained)
                print_evaluation(ev, f"{model}: clean vs adversarial (white-box)")
    finally:  # user errors: one line from the CLI's handler (cli/app.py); bugs keep their traceback
        shutdown_distributed()
