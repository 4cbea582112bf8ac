"""The main job (`advdet demo`, `make demo`) on the embedded default.

1. make sure the ``shapes`` benchmark exists (generated on first use);
2. the transfer table of RAD Table 3 on the first ``limit`` images of ``shapes-val``: RAD and the
   baselines (classifier PGD on the zoo ``classifier``, eps-bounded DAG, Dfool, RAD's Loc baseline
   ``loc-shift``, and the Gaussian Ablation) crafted on the ``yolov3`` surrogate, against every
   trained zoo detector (:func:`advdet.bench.transfer.transfer_matrix`);
3. the RobustDet Table 1 robustness table (:func:`advdet.bench.robustness.robustness_table`) of the
   robust zoo models that have trained weights (``ssd_vgg-*``, ``robustdet*``), with the zoo ``ssd_vgg``
   as baseline when trained, on ``robust_limit`` images with ``robust_steps`` iterations per attack
   (reduced so that the demo stays under 5 minutes);
4. one report (tables, figures, image grids) in ``out`` (default ``./advdet-report``).

Whatever is not available is skipped with a note, never an error: zoo models without weights, attacks
not registered, the classifier (its attacks are dropped), the robust models. When ``yolov3`` has no
weights yet the first trained zoo detector crafts the detection attacks instead (noted).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

__all__ = ["DEMO_ATTACKS", "DEMO_LIMIT", "DEMO_ROBUST_LIMIT", "DEMO_ROBUST_STEPS", "DEMO_SURROGATE", "run_demo",
           "trained_detectors", "robust_models"]

DEMO_SURROGATE = "yolov3"
#: RAD Table 3's rows: its "Loc" baseline is ``loc-shift`` (``loc`` is A_loc, RobustDet's, everywhere)
DEMO_ATTACKS = ("rad", "cls-pgd", "dag-eps", "dfool", "loc-shift")
#: RAD sec. 4.1: "All attacks are conducted with the step length 2 for 10 iterations": the class defaults of
#: these attacks (RAD's images per relevance graph are the surrogate's ``relevance_cpu_micro_batch``: 2 on yolov3)
#: images of shapes-val in the transfer table: RAD on yolov3 costs ~20 CPU-seconds per image (10 steps x 4
#: distinct SI inputs, each a double backward through the two LRP passes of the reference head), the other rows ~3 s per image for all victims,
#: so 8 images keep the demo under 5 minutes on a 2-core CPU (docs/benchmarks.md has the measurement)
DEMO_LIMIT = 8
#: the robustness table in the demo: 4 images, 5 iterations for every iterative attack (RobustDet's own
#: 20 PGD / 150 DAG steps on 7 robust models would take ~25 CPU-seconds per model and image; run
#: `advdet bench robustness` for the full protocol)
DEMO_ROBUST_LIMIT = 4
DEMO_ROBUST_STEPS = 5
DEMO_EPS = 16.0


def trained_detectors() -> list[str]:
    """Zoo detectors with shipped weights, standard training only (the transfer victims)."""
    from advdet.models.zoo import zoo_entries

    return [e.name for e in zoo_entries() if e.kind == "detector" and e.trained and e.method == "standard"]


def robust_models() -> list[str]:
    """Robust zoo models with shipped weights (detectors trained by an adversarial method: ``ssd_vgg-*``,
    ``robustdet*``), preceded by the trained zoo model they start from (``ssd_vgg``), the standard
    baseline; empty when no robust model is trained."""
    from advdet.models.zoo import zoo_entries

    entries = zoo_entries()
    robust = [e for e in entries if e.trained and e.kind == "detector" and e.method != "standard"]
    if not robust:
        return []
    inits = {e.init for e in robust if e.init is not None}
    base = [e.name for e in entries if e.name in inits and e.trained]
    return base + [e.name for e in robust]


def run_demo(out: str | Path | None = "advdet-report", *, limit: int = DEMO_LIMIT,
             robust_limit: int = DEMO_ROBUST_LIMIT, robust_steps: int | None = DEMO_ROBUST_STEPS,
             batch_size: int = 8, seed: int = 0, device=None, eps: float = DEMO_EPS,
             attacks: tuple[str, ...] = DEMO_ATTACKS, surrogate: str = DEMO_SURROGATE,
             victims: list[str] | None = None, robust: list[str] | None = None, data: str = "shapes-val",
             models: dict | None = None, attack_kwargs: dict | None = None, allow_untrained: bool = False,
             examples: int = 2, progress: bool = True, note: Callable[[str], None] | None = None) -> dict:
    """Run the demo (see the module docstring); returns ``{"transfer", "robustness", "notes", "report",
    "seconds"}``. ``victims``, ``robust``, ``models``, ``allow_untrained`` override what is found in the
    zoo (tests); ``note`` receives every "skipped ..." line as it happens."""
    from advdet.bench.transfer import transfer_matrix
    from advdet.bench.transfer_report import transfer_report

    t0 = time.perf_counter()
    notes: list[str] = []

    def say(msg: str) -> None:
        notes.append(msg)
        log.info(msg)
        if note is not None:
            note(msg)

    if data in ("shapes-val", "shapes-train"):
        from advdet.data.shapes import ensure_default_shapes

        root = ensure_default_shapes()
        log.info("shapes benchmark at %s", root)

    victims = list(victims) if victims is not None else trained_detectors()
    transfer = None
    if not victims:
        say("transfer table skipped: no trained zoo detector (train one with `advdet zoo train NAME`)")
    else:
        sur = surrogate
        if sur not in victims and models is None and not allow_untrained:
            from advdet.models.zoo import zoo_entry

            if not zoo_entry(sur).trained:
                say(f"surrogate {sur} has no trained weights yet: the detection attacks are crafted on "
                    f"{victims[0]} instead")
                sur = victims[0]
        transfer = transfer_matrix([sur], list(attacks), victims, data, eps=eps, limit=limit, batch_size=batch_size,
                                   seed=seed, device=device, attack_kwargs=attack_kwargs, progress=progress,
                                   models=models, allow_untrained=allow_untrained, skip_unavailable=True,
                                   examples=examples)
        for s in transfer["skipped"]:
            say(f"skipped: {s}")

    robust = list(robust) if robust is not None else robust_models()
    robustness = None
    if not robust:
        say("robustness table skipped: no robust zoo model (ssd_vgg-*, robustdet*) has trained weights yet")
    else:
        try:
            from advdet.bench.robustness import robustness_table
        except ImportError as err:
            say(f"robustness table skipped: advdet.bench.robustness is not available ({err})")
        else:
            try:
                robustness = robustness_table(robust, data=data, limit=robust_limit, steps=robust_steps,
                                              batch_size=batch_size, seed=seed, device=device, progress=progress,
                                              detectors=models,
                                              allow_untrained=allow_untrained)
            except Exception as err:  # the demo reports what failed instead of dying after the transfer table
                log.exception("robustness table failed")
                say(f"robustness table failed: {type(err).__name__}: {err}")

    report_path = None
    if out is not None:
        from advdet.bench.report import Report

        rep = transfer_report(transfer, title="advdet demo: transfer (RAD) and robustness (RobustDet) on shapes") \
            if transfer is not None else Report("advdet demo")
        if notes:
            rep.add_text("Notes:\n\n" + "\n".join(f"- {n}" for n in notes))
        if robustness is not None:
            from advdet.bench.robustness_report import robustness_report

            robustness_report(robustness, report=rep)
        report_path = rep.write(out)
    return {"transfer": transfer, "robustness": robustness, "notes": notes,
            "report": None if report_path is None else str(report_path), "seconds": time.perf_counter() - t0}
