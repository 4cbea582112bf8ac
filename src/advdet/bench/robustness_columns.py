"""The columns of a robustness table (RobustDet Table 1): attack names, titles, and each column's attack
on a model with the table's budget, attacking with the ground truth."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from advdet.attacks.base import Attack
from advdet.attacks.registry import ATTACKS, attacks_of_kind, build_attack
from advdet.attacks.spec import ALIASES, resolve_name
from advdet.data.errors import UnknownNameError
from advdet.models.detector import Detector

__all__ = ["TABLE_ATTACKS", "ATTACK_LABELS", "attack_label", "check_attack_names", "column_names",
           "build_table_attack", "attack_targets"]

#: the columns of RobustDet Table 1, in order (every column is a registry name; ``clean``: no attack)
TABLE_ATTACKS = ("clean", "cls", "loc", "cwa", "dag-robustdet")
ATTACK_LABELS = {"clean": "Clean", "cls": "A_cls", "loc": "A_loc", "cwa": "CWA", "dag-robustdet": "DAG (RobustDet)",
                 "dag": "DAG (Xie)", "dag-eps": "DAG (eps)", "loc-shift": "Loc shift", "mtd": "MTD", "pgd": "PGD"}


def attack_label(name: str) -> str:
    """The column title of an attack (``cls`` -> ``A_cls``, ``dag-robustdet`` -> ``DAG (RobustDet)``)."""
    return ATTACK_LABELS.get(name, name)


def column_names(attacks: Sequence[str]) -> list[str]:
    """The columns with old aliases replaced (``dag-xie`` -> ``dag``, with its deprecation note)."""
    return [a if a == "clean" or a in ATTACKS or a not in ALIASES else resolve_name(a) for a in attacks]


def check_attack_names(attacks: Sequence[str]) -> None:
    if not attacks:
        raise ValueError("no attacks given (e.g. clean,cls,loc,cwa,dag-robustdet)")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"attack listed twice: {list(attacks)}")
    for a in attacks:
        if a == "clean":
            continue
        if a not in ATTACKS:
            known = ", ".join(attacks_of_kind("detector") + attacks_of_kind("none"))
            raise UnknownNameError(f"unknown attack {a!r}; the table's columns are {', '.join(TABLE_ATTACKS)} "
                                   f"and any registered detector attack: {known}")
        if ATTACKS[a].surrogate_kind == "classifier":
            raise ValueError(f"attack {a!r} attacks an image classifier, not the detector itself; it has no "
                             "place in a white-box robustness table")


def build_table_attack(name: str, model: Detector, *, eps: float = 8.0, steps: int | None = None,
                       seed: int = 0, overrides: dict | None = None) -> Attack | None:
    """The attack of a table column on ``model`` (None for ``clean``).

    Attacks whose class ``budget`` is ``"eps=step"`` (``pgd``, ``cls``, ``loc``, ``cwa``, ``mtd``) get
    ``eps`` with ``step = eps`` (RobustDet's evaluation: eps = alpha = 8) and ``steps`` when given
    (default 20); every other attack (``dag-robustdet``: RobustDet's DAG, ``dag``: Xie's, default 150
    steps, no eps) gets only ``steps`` when given. ``overrides`` (keyword arguments, a spec's settings)
    win over all of these.
    """
    if name == "clean":
        return None
    name = column_names([name])[0]
    kw: dict[str, Any] = {}
    if getattr(ATTACKS.get(name), "budget", None) == "eps=step":
        kw.update(eps=float(eps), step=float(eps))
    if steps is not None:
        kw["steps"] = int(steps)
    kw.update(overrides or {})
    kw["seed"] = int(seed)
    return build_attack(name, model, **kw)


def attack_targets(targets: list[dict], dev: torch.device) -> list[dict]:
    """Ground truth for the attacks, on ``dev``: boxes and labels of a collated batch's targets (difficult
    VOC objects left out, as ssd.pytorch's test set does)."""
    out = []
    for t in targets:
        diff = t.get("difficult")
        keep = ~diff.bool() if diff is not None else torch.ones(len(t["labels"]), dtype=torch.bool)
        out.append({"boxes": t["boxes"][keep].to(dev).float(), "labels": t["labels"][keep].to(dev).long()})
    return out
