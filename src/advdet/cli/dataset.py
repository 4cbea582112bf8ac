"""`advdet dataset`: the AOCO protocol of RAD (section 5), a detection and a segmentation adversarial
split of a COCO-format dataset, optionally scored on victim models; shardable under torchrun."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from advdet.cli.app import app, console
from advdet.cli.attack import print_card_summary, print_evaluation
from advdet.cli.options import SPEC_HELP, AllowUntrained, Device, SettingsOption, attack_spec, budget_flags


@app.command("dataset")
def dataset_cmd(
        data: str = typer.Option(..., help="shapes-train, shapes-val, or an images folder (with --ann), "
                                 "e.g. COCO val2017."),
        out: Path = typer.Option(..., help="Output folder: det/ and seg/ (COCO format) and aoco.json."),
        ann: Optional[Path] = typer.Option(None, help="COCO instances JSON for an images folder."),
        det_surrogate: str = typer.Option("yolov3", help="Detection surrogate ('' to skip the det split)."),
        seg_surrogate: str = typer.Option("maskrcnn", help="Mask surrogate ('' to skip the seg split)."),
        det_weights: Optional[Path] = typer.Option(None, help="Weights of the detection surrogate."),
        seg_weights: Optional[Path] = typer.Option(None, help="Weights of the mask surrogate."),
        attack: str = typer.Option("rad", help=f"The attack: {SPEC_HELP}."),
        eps: Optional[float] = typer.Option(None, help="Linf budget, 0-255 units (default 16, RAD's)."),
        step: Optional[float] = typer.Option(None, help="Step size, 0-255 units (default: the attack's)."),
        steps: Optional[int] = typer.Option(None, help="Iterations (default: the attack's)."),
        set_: SettingsOption = [],
        limit: Optional[int] = typer.Option(None, help="The first N images only."),
        batch_size: int = typer.Option(8, help="Images per attack call (part of the job)."),
        seed: int = typer.Option(0, help="Seed: the same seed gives byte-identical files."),
        evaluate: Optional[str] = typer.Option(None, help="Victims to score, NAME[=WEIGHTS],... "
                                               "(clean vs adversarial mAP into each card)."),
        skip_bad: bool = typer.Option(False, help="Skip and count bad images instead of failing."),
        labels: bool = typer.Option(True, help="Ground-truth targets for loss-based attacks (--no-labels: "
                                    "the surrogate's clean predictions)."),
        device: Device = None,
        workers: int = typer.Option(0, help="DataLoader workers decoding images."),
        size: Optional[int] = typer.Option(None, help="Letterbox size of torchvision:BUILDER surrogates "
                                           "(RAD's AOCO: 416; default: the builder's own)."),
        seg_size: Optional[int] = typer.Option(None, help="Letterbox size of the seg split when it differs "
                                               "(RAD's AOCO: 448)."),
        untrained: AllowUntrained = False,
) -> None:
    """Build the AOCO protocol (RAD sec. 5): out/det crafted on the detection surrogate, out/seg on the
    mask surrogate; resumable; under `torchrun -m advdet dataset` the images are sharded by rank."""
    from advdet.bench.aoco import build_aoco, parse_victims
    from advdet.bench.distributed import init_distributed, shutdown_distributed

    try:
        # one line naming the attack and the bad key or value; --eps/--step/--steps are sugar for its keys
        spec = budget_flags(attack_spec(attack, set_), step=step, steps=steps, eps=eps)
        kw = dict(spec.kwargs)
        kw.setdefault("eps", 16.0)
        rank, world, dev = init_distributed(device)
        cards = build_aoco(data, out, ann=ann, det_surrogate=det_surrogate or None,
                           seg_surrogate=seg_surrogate or None, det_weights=det_weights, seg_weights=seg_weights,
                           attack=spec.name, eps=kw.pop("eps"), step=None, steps=None, attack_kwargs=kw,
                           limit=limit,
                           batch_size=batch_size, seed=seed, skip_bad=skip_bad, victims=parse_victims(evaluate),
                           device=str(dev) if dev else None, pretrained=not untrained, labels=labels,
                           workers=workers, input_size=size, seg_input_size=seg_size)
    finally:  # user errors: one line from the CLI's handler (cli/app.py)
        shutdown_distributed()
    if rank != 0:
        return
    for split, card in cards.items():
        procs = f" ({world} processes)" if world > 1 else ""
        print_card_summary(card, out / split,
                           f"AOCO {split}: {card['attack']['name']} on {card['surrogate']['name']}{procs}")
        if card.get("evaluation"):
            print_evaluation(card["evaluation"], f"AOCO {split}: clean vs adversarial")
    console.print(f"summary: {out / 'aoco.json'}")
