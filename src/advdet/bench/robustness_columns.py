"""The columns of a robustness table (RobustDet Table 1): attack names, titles, and each column's attack
on a model with the table's budget, attacking with the ground truth."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from advdet.attacks.base import Attack
from advdet.attacks.registry import ATTACKS, CLASSIFIER_ATTACKS, build_attack
from advdet.data.errors import UnknownNameError
from advdet.models.detector import Detector

__all__ = ["TABLE_ATTACKS", "PGD_FAMILY", "ATTACK_LABELS", "COLUMN_ATTACKS", "attack_label", "check_attack_names",
           "build_table_attack", "attack_targets"]

#: the columns of RobustDet Table 1, in order
TABLE_ATTACKS = ("clean", "cls", "loc", "cwa", "dag")
#: attacks that take the table's ``eps`` (with step = eps, the reference's alpha = eps) and ``steps``
PGD_FAMILY = ("pgd", "cls", "loc", "cwa", "mtd")
ATTACK_LABELS = {"clean": "Clean", "cls": "A_cls", "loc": "A_loc", "cwa": "CWA", "dag": "DAG",
                 "dag-xie": "DAG (Xie)", "mtd": "MTD", "pgd": "PGD"}
#: table columns whose attack has another registry name: RobustDet's DAG, and the original DAG
COLUMN_ATTACKS = {"dag": "dag-robustdet", "dag-xie": "dag"}


def attack_label(name: str) -> str:
    """The column title of an attack as in RobustDet Table 1 (``cls`` -> ``A_cls``)."""
    return ATTACK_LABELS.get(name, name)


def check_attack_names(attacks: Sequence[str]) -> None:
    if not attacks:
        raise ValueError("no attacks given (e.g. clean,cls,loc,cwa,dag)")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"attack listed twice: {list(attacks)}")
    for a in attacks:
        if a == "clean" or a in COLUMN_ATTACKS:
            continue
        if a not in ATTACKS:
            known = ", ".join(n for n in ATTACKS if n not in CLASSIFIER_ATTACKS)
            raise UnknownNameError(f"unknown attack {a!r}; the table's columns are {', '.join(TABLE_ATTACKS)}, "
                                   f"dag-xie, and any registered detector attack: {known}")
        if a in CLASSIFIER_ATTACKS:
            raise ValueError(f"attack {a!r} attacks an image classifier, not the detector itself; it has no "
                             "place in a white-box robustness table")


def build_table_attack(name: str, model: Detector, *, eps: float = 8.0, steps: int | None = None,
                       seed: int = 0, overrides: dict | None = None) -> Attack | None:
    """The attack of a table column on ``model`` (None for ``clean``).

    PGD-family columns (``pgd``, ``cls``, ``loc``, ``cwa``, ``mtd``) get ``eps`` with ``step = eps``
    (RobustDet's evaluation: eps = alpha = 8) and ``steps`` when given (default 20); ``dag`` is
    :class:`RobustDetDAG` and ``dag-xie`` the registry's ``dag`` (``steps`` when given, default 150; no
    eps); any other registered attack gets
    only ``steps`` when given. ``overrides`` (keyword arguments) win over all of these.
    """
    if name == "clean":
        return None
    kw: dict[str, Any] = {}
    reg_name = COLUMN_ATTACKS.get(name, name)
    if name in PGD_FAMILY:
        kw.update(eps=float(eps), step=float(eps))
    if steps is not None:
        kw["steps"] = int(steps)
    kw.update(overrides or {})
    kw["seed"] = int(seed)
    return build_attack(reg_name, model, **kw)


def attack_targets(targets: list[dict], dev: torch.device) -> list[dict]:
    """Ground truth for the attacks, on ``dev``: boxes and labels of a collated batch's targets (difficult
    VOC objects left out, as ssd.pytorch's test set does)."""
    out = []
    for t in targets:
        diff = t.get("difficult")
        keep = ~diff.bool() if diff is not None else torch.ones(len(t["labels"]), dtype=torch.bool)
        out.append({"boxes": t["boxes"][keep].to(dev).float(), "labels": t["labels"][keep].to(dev).long()})
    return out
