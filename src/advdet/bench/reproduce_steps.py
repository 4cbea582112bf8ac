"""What a reproduction runs: its targets, models and attacks, and its resumable steps.

Each step is one benchmark call whose result is one resumable file (:mod:`advdet.bench.reproduce`).

RAD (surrogate ``yolov3``, every zoo detector a victim, eps 16, ``shapes-val``):

- ``table3``: every attack (RAD, DAG, Dfool, Loc/Size, OSFD, the four classifier attacks) with No Attack
  and the Gaussian Ablation; it also gives Table 4 (segmentation mAP of maskrcnn) and Table 5 (RMSE);
- ``table1_node_type_loc``, ``_size`` (group ``table1_node_type``): RAD with ``loc`` and ``size`` nodes
  (``cls``, RAD's default, is Table 3's row);
- ``table2_technique_none``, ``_DI``, ``_TI`` (group ``table2_technique``): RAD with no update technique, DI
  and TI (SI, RAD's default, is Table 3's row);
- ``fig7_eps_4``, ``_8``, ``_12`` (group ``fig7_eps``): RAD at eps 4, 8, 12 (eps 16 is Table 3's row);
- ``ensembles``: the leave-one-out ensembles, every victim attacked by the ensemble of the other victims
  (``ens-pgd``: sign-PGD on their detection losses, each member's gradient L1-normalised, eps 16): how
  close the project's goal, halving the mAP50 of every held-out detector, comes when the attacker holds
  every other one.

A sweep is one step per value, so that ``--jobs`` can share its RAD runs out evenly (one RAD run takes
minutes; a whole sweep in one step left a worker idle at the end); the page gathers a group's steps into one
table. Every step has its own No Attack and Ablation rows on the same images and resamples.

RobustDet (the zoo ``ssd_vgg`` and the six robust entries, eps 8), one step per model, so that ``--jobs``
shares the models out and a long run resumes model by model:

- ``table1_MODEL`` (group ``table1``): clean, A_cls, A_loc, CWA and RobustDet's DAG for one entry;
- ``fig7_steps_MODEL`` (group ``fig7_steps``): A_cls and A_loc against the number of PGD steps (Fig. 7a/b).

Every model is evaluated on the same images with the same per-batch attack seeds and its mAP50 on the same
bootstrap resamples (drawn from the number of images, ``n_boot`` and the bootstrap seed), so the page
gathers a group's steps into the table one call over all the models gives, intervals and paired
differences included (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

__all__ = ["TARGETS", "Step", "rad_steps", "step_groups", "robustdet_steps", "step_models", "DEFAULT_LIMITS",
           "RAD_SURROGATE", "RAD_VICTIMS", "RAD_TABLE3_ATTACKS", "RAD_ENSEMBLE_ATTACKS", "ROBUST_MODELS",
           "step_cost"]

TARGETS = ("rad", "robustdet")
FORMAT = 1

#: RAD's surrogate, victims and Table 3 attacks (RAD sec. 4.1: eps 16, step 2, 10 iterations)
RAD_SURROGATE = "yolov3"
RAD_VICTIMS = ("yolov3", "ssd_vgg", "retinanet", "fcos", "fasterrcnn", "maskrcnn")
RAD_TABLE3_ATTACKS = ("rad", "dag-eps", "dfool", "loc-shift", "size", "osfd", "cls-pgd", "cls-si-pgd",
                      "cls-mi-di-pgd", "cls-mi-ti-pgd")
#: the attack of the leave-one-out ensembles, the transfer regime's (docs/benchmark.md): sign-PGD with every
#: member's gradient L1-normalised (plain ``pgd`` on an ensemble sums the members' losses, and yolov3's dominates)
RAD_ENSEMBLE_ATTACKS = ("ens-pgd",)
RAD_EPS = 16.0
#: the sweeps' values that are not Table 3's RAD row (whose defaults are cls nodes, SI, eps 16)
RAD_NODE_TYPES = ("loc", "size")
RAD_TECHNIQUES = ("none", "DI", "TI")
RAD_SWEEP_EPS = (4.0, 8.0, 12.0)
RAD_DEFAULT_SETTING = {"node_type": "cls", "technique": "SI", "eps": RAD_EPS}

#: RobustDet: the standard model first (the baseline of the paired differences), then the robust entries
ROBUST_MODELS = ("ssd_vgg", "ssd_vgg-at-cls", "ssd_vgg-at-loc", "ssd_vgg-mtd", "ssd_vgg-cwat", "robustdet",
                 "robustdet-cfr")
ROBUST_ATTACKS = ("clean", "cls", "loc", "cwa", "dag-robustdet")
ROBUST_SWEEP_STEPS = (1, 5, 10, 20)
#: default images: the issue's runs (RAD on >= 200 images, RobustDet Table 1 on >= 100)
DEFAULT_LIMITS = {"rad": 200, "robustdet": 100}


@dataclass(frozen=True)
class Step:
    """One resumable part of a reproduction: a benchmark call (``kind``: ``transfer``, ``robustness`` or
    ``steps_sweep``) with its own parameters; written to ``OUT/<target>/<name>.json``; the steps of one
    ``group`` make one table of the page."""

    name: str
    title: str
    kind: str
    params: dict = field(default_factory=dict)
    group: str = ""  # the page section (one table) the step belongs to; "" is the step itself

    @property
    def section(self) -> str:
        return self.group or self.name


def rad_steps(surrogate: str = RAD_SURROGATE, victims: Sequence[str] = RAD_VICTIMS,
              attacks: Sequence[str] = RAD_TABLE3_ATTACKS, classifier: str = "classifier") -> list[Step]:
    """The RAD reproduction's steps (see the module docstring)."""
    base = {"surrogates": [surrogate], "victims": list(victims), "classifier": classifier}
    rad = {**base, "attacks": ["rad"]}
    steps = [Step("table3", "Tables 3-5: every attack, the classifier rows, the Gaussian ablation", "transfer",
                  {**base, "attacks": list(attacks), "eps": RAD_EPS})]
    steps += [Step(f"table1_node_type_{v}", f"Table 1: {v} nodes", "transfer",
                   {**rad, "eps": RAD_EPS, "sweep": "node_type", "sweep_values": [v]}, group="table1_node_type")
              for v in RAD_NODE_TYPES]
    steps += [Step(f"table2_technique_{v}", f"Table 2: technique {v}", "transfer",
                   {**rad, "eps": RAD_EPS, "sweep": "technique", "sweep_values": [v]}, group="table2_technique")
              for v in RAD_TECHNIQUES]
    steps += [Step(f"fig7_eps_{e:g}", f"Fig. 7: eps {e:g}", "transfer",
                   {**rad, "eps": e, "sweep": "eps", "sweep_values": [e]}, group="fig7_eps") for e in RAD_SWEEP_EPS]
    steps.append(Step("ensembles", "Leave-one-out ensembles: each victim attacked by the other victims", "transfer",
                      {"surrogates": [], "victims": list(victims), "classifier": classifier,
                       "attacks": list(RAD_ENSEMBLE_ATTACKS), "eps": RAD_EPS, "leave_one_out": True}))
    return steps


def step_groups(steps: Sequence[Step]) -> dict[str, list[str]]:
    """Per page section (a step's ``group``, or its name) the names of its steps, in order."""
    groups: dict[str, list[str]] = {}
    for s in steps:
        groups.setdefault(s.section, []).append(s.name)
    return groups


def robustdet_steps(models: Sequence[str] = ROBUST_MODELS, attacks: Sequence[str] = ROBUST_ATTACKS,
                    sweep_steps: Sequence[int] = ROBUST_SWEEP_STEPS, attack_steps: int | None = None) -> list[Step]:
    """The RobustDet reproduction's steps, one per (table, model) (see the module docstring); ``attack_steps``
    overrides the iterations of Table 1's attacks (tests: 1)."""
    table = {"attacks": list(attacks), **({"steps": attack_steps} if attack_steps is not None else {})}
    steps = [Step(f"table1_{m}", f"Table 1: {m} clean, under A_cls, A_loc, CWA, DAG", "robustness",
                  {"models": [m], **table}, group="table1") for m in models]
    steps += [Step(f"fig7_steps_{m}", f"Fig. 7a/b: {m} under A_cls and A_loc against the number of steps",
                   "steps_sweep", {"models": [m], "attacks": ["cls", "loc"], "steps": list(sweep_steps)},
                   group="fig7_steps") for m in models]
    return steps


#: RAD's relative cost per technique, a step's RAD row and its two reference rows (16 images, one thread:
#: SI 139-149 s, DI 186 s, none 45 s, TI 50 s)
_RAD_TECHNIQUE_COST = {"none": 3.0, "TI": 3.0, "SI": 10.0, "DI": 13.0}


def step_cost(step: Step) -> float:
    """A rough relative cost of a step, to start the costliest first when steps run in parallel: a RAD row
    (per sweep value or eps) counts 10 with SI, RAD's default (:data:`_RAD_TECHNIQUE_COST` for the others),
    any other attack row 0.5 (16 images: RAD 130-140 s, the other rows 3-8 s of crafting and 2 s of
    evaluation each; Table 3 210 s), and 0.7 per member of every leave-one-out ensemble (each member is one
    more surrogate gradient per step; six ensembles of five members took about 150 CPU-s on 8 images); a
    robustness cell (model x attack) counts 40, about the mean attack
    steps of Table 1 (20-step PGDs, a 150-step DAG), a steps-sweep cell the sum of its steps."""
    p = step.params
    if step.kind == "transfer":
        values = p.get("sweep_values") or (p["eps"] if isinstance(p["eps"], list) else [p["eps"]])
        if p.get("leave_one_out"):
            pool = len(p["victims"]) if p["leave_one_out"] is True else len(p["leave_one_out"])
            return float(len(p["attacks"]) * pool * (pool - 1) * len(values) * 7 / 10)
        if p.get("sweep") == "technique":
            rad = sum(_RAD_TECHNIQUE_COST.get(str(v), 10.0) for v in values)
        else:
            rad = 10.0 * len(values)
        return float(sum(rad if a == "rad" else 0.5 * len(values) for a in p["attacks"]))
    cells = len(p["models"]) * len(p["attacks"])
    return float(cells * (sum(p["steps"]) if step.kind == "steps_sweep" else 40))


def step_models(step: Step) -> list[str]:
    p = step.params
    if step.kind == "transfer":
        names = list(p["surrogates"]) + list(p["victims"])
        if any(a.startswith("cls-") for a in p["attacks"]):
            names.append(p["classifier"])
        return list(dict.fromkeys(names))
    return list(p["models"])
