"""The rows of a transfer table (RAD Table 3): which attack, crafted on which model, with which settings.

Rows: ``No Attack`` (the clean images), ``Ablation`` (Gaussian noise, sigma = 9 in 0-255 units, RAD sec.
4.1) and one row per attack (and per sweep value).

Classifier attacks (``surrogate_kind = "classifier"`` on the class: cls-pgd, cls-si-pgd, cls-mi-di-pgd,
cls-mi-ti-pgd) are crafted on the zoo ``classifier`` (``classifier=`` to change it), once, whatever the
detector surrogates.

Sweeps (one at a time):

- ``eps=[4, 8, 12, 16]``: every attack at every eps (RAD Fig. 7);
- ``sweep="nodes"``: values ``static:M`` / ``dynamic:T`` (RAD Table 7; attacks with a ``nodes`` parameter);
- ``sweep="technique"``: ``none``, ``DI``, ``TI``, ``SI``, ``MI`` or combinations ``SI+MI`` (RAD Table 2;
  attacks with a ``transforms`` parameter);
- ``sweep="node_type"``: ``cls``, ``loc``, ``size`` (RAD Table 1; attacks with a ``node_type`` parameter).

An attack without the swept parameter runs once, with a note. Attacks whose ``budget`` is ``eps`` or
``eps=step`` get the table's eps (unless their spec sets one). Seeds: the one crafting policy of
:mod:`advdet.attacks.seeding` (``seed_batch(attack, seed, index of the batch's first image)``), so the same
call gives the same numbers and ``advdet attack`` with the same options crafts the same bytes.

Ensembles (issue 24, item 1): a surrogate named ``a+b+c`` is ONE surrogate, the members' ensemble
(``advdet.attacks.ensemble``: every attack averages its objective over the members at every step); its
black-box victims are the victims that are not members. ``leave_one_out=True`` (or a list of models, the
pool; ``True``: the victims) adds, per detector attack, one row per pool model ``h``: the attack crafted
on the ensemble of the other pool models, labelled ``ens-<attack> without <h>``; its black-box number is
``h`` alone (``held_out``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from torch import nn

from advdet.attacks.registry import ATTACKS
from advdet.attacks.seeding import crafting_defaults
from advdet.attacks.spec import accepts, check_kwargs, transforms_for
from advdet.data.errors import UnknownNameError

__all__ = ["NO_ATTACK", "ABLATION", "SWEEPS", "DEFAULT_SWEEP_VALUES", "RowSpec", "plan_rows", "transforms_for",
           "ensemble_members", "leave_one_out_label", "build_row_attack", "is_classifier_attack", "sweep_values_of"]

NO_ATTACK, ABLATION = "No Attack", "Ablation"
SWEEPS = ("eps", "nodes", "technique", "node_type")
DEFAULT_SWEEP_VALUES: dict[str, list] = {
    "eps": [4.0, 8.0, 12.0, 16.0],
    "nodes": ["dynamic:-1", "dynamic:-2", "dynamic:-3", "static:10", "static:20", "static:30"],
    "technique": ["none", "DI", "TI", "SI", "MI"],
    "node_type": ["size", "loc", "cls"],
}
#: the keyword each sweep sets on an attack (the attack's parameters, ``attacks.spec.accepts``, decide)
_SWEEP_PARAM = {"eps": "eps", "nodes": "nodes", "technique": "transforms", "node_type": "node_type"}


def is_classifier_attack(name: str, registry: Mapping[str, type] | None = None) -> bool:
    """Whether attack ``name`` is crafted on an image classifier (its class's ``surrogate_kind``)."""
    cls = (registry if registry is not None else ATTACKS).get(name)
    return cls is not None and getattr(cls, "surrogate_kind", "detector") == "classifier"


def _takes_eps(cls: type) -> bool:
    return getattr(cls, "budget", "eps") in ("eps", "eps=step")


def _sweep_kwargs(sweep: str, value: Any) -> dict:
    if sweep == "eps":
        return {"eps": float(value)}
    if sweep == "technique":
        return {"technique": str(value)}
    if sweep == "node_type":
        if value not in ("cls", "loc", "size"):
            raise ValueError(f"node_type sweep values are cls, loc, size; got {value!r}")
        return {"node_type": value}
    if sweep == "nodes":
        kind, _, param = str(value).partition(":")
        if kind not in ("static", "dynamic") or not param:
            raise ValueError(f"nodes sweep values look like static:20 or dynamic:-1; got {value!r}")
        return {"nodes": "static", "m": int(param)} if kind == "static" else {"nodes": "dynamic",
                                                                               "threshold": float(param)}
    raise ValueError(f"unknown sweep {sweep!r}; choose one of {', '.join(SWEEPS)}")


# ------------------------------------------------------------------------------------------------- rows
@dataclass
class RowSpec:
    """One row of the table: which attack, crafted on which model, with which settings."""

    label: str
    attack: str | None                 # registry name; None for No Attack
    kind: str                          # "reference" | "classifier" | "detector"
    surrogate: str | None              # crafting model (None: no model)
    kwargs: dict = field(default_factory=dict)
    sweep: str | None = None
    sweep_value: Any = None
    held_out: str | None = None        # leave-one-out rows: the victim left out of the ensemble


def ensemble_members(surrogate: str | None) -> list[str]:
    """The models a surrogate is made of: ``a+b`` -> [a, b]; ``a`` -> [a]; None -> []."""
    if surrogate is None:
        return []
    from advdet.attacks.ensemble import parse_ensemble

    return parse_ensemble(surrogate)


def leave_one_out_label(attack: str, held_out: str) -> str:
    """The label of a leave-one-out row: ``ens-<attack> without <held_out>`` (an ensemble attack such as
    ``ens-pgd`` keeps its own name)."""
    return f"{attack if attack.startswith('ens-') else 'ens-' + attack} without {held_out}"


def plan_rows(surrogates: Sequence[str], attacks: Sequence[str], *, eps: float | Sequence[float] = 16.0,
              sweep: str | None = None, sweep_values: Sequence | None = None, classifier: str = "classifier",
              attack_kwargs: Mapping[str, dict] | None = None, registry: Mapping[str, type] | None = None,
              notes: list[str] | None = None, leave_one_out: Sequence[str] | None = None) -> list[RowSpec]:
    """The rows of a transfer table (see the module docstring), in display order: No Attack, Ablation,
    then the attacks in the given order (classifier attacks once; detector attacks once per surrogate,
    then, with ``leave_one_out`` (the pool of models), once per pool model ``h`` on the ensemble of the
    other pool models, ``held_out=h``), each expanded over the sweep values. Unknown attack names raise
    ``KeyError``."""
    registry = registry if registry is not None else ATTACKS
    notes = notes if notes is not None else []
    attack_kwargs = dict(attack_kwargs or {})
    eps_list = [float(e) for e in eps] if isinstance(eps, (list, tuple)) else [float(eps)]
    if len(eps_list) > 1:
        if sweep not in (None, "eps"):
            raise ValueError("one sweep at a time: an eps list is the eps sweep; drop the other sweep")
        sweep, sweep_values = "eps", eps_list
    elif sweep == "eps":
        sweep_values = [float(v) for v in (sweep_values or DEFAULT_SWEEP_VALUES["eps"])]
    elif sweep is not None:
        if sweep not in SWEEPS:
            raise ValueError(f"unknown sweep {sweep!r}; choose one of {', '.join(SWEEPS)}")
        sweep_values = list(sweep_values or DEFAULT_SWEEP_VALUES[sweep])
    base_eps = eps_list[0]
    rows = [RowSpec(NO_ATTACK, None, "reference", None),
            RowSpec(ABLATION, "gaussian", "reference", None, dict(attack_kwargs.get("gaussian", {})))]
    multi = len(surrogates) > 1
    pool = list(dict.fromkeys(leave_one_out or []))
    if leave_one_out is not None and len(pool) < 2:
        raise ValueError(f"leave-one-out needs at least two models in its pool, got {pool}")
    for name in attacks:
        if name == "gaussian":
            continue  # the Ablation row
        if name not in registry:
            raise UnknownNameError(f"unknown attack {name!r}; registered: {', '.join(registry)}")
        cls = registry[name]
        user = dict(attack_kwargs.get(name, {}))
        if registry is ATTACKS:
            user = check_kwargs(name, user)  # one-line error for a bad setting before anything is crafted
        is_cls = is_classifier_attack(name, registry)
        crafters = [(classifier, name, None)] if is_cls else \
            [(sur, name if not multi else f"{name} ({sur})", None) for sur in surrogates]
        if not is_cls:
            crafters += [("+".join(p for p in pool if p != h), leave_one_out_label(name, h), h) for h in pool]
        for sur, label, held in crafters:
            base = dict(user)
            if "eps" not in base and _takes_eps(cls):
                base["eps"] = base_eps
            values: list = [None]
            if sweep is not None:
                if accepts(cls, _SWEEP_PARAM[sweep]):
                    values = list(sweep_values)
                else:
                    notes.append(f"{name}: no {_SWEEP_PARAM[sweep]!r} parameter, run once without the {sweep} sweep")
            for v in values:
                kw = dict(base)
                row_label = label
                if v is not None:
                    kw.update(_sweep_kwargs(sweep, v))
                    row_label = f"{label} eps={float(v):g}" if sweep == "eps" else f"{label} [{v}]"
                rows.append(RowSpec(row_label, name, "classifier" if is_cls else "detector", sur, kw,
                                    sweep if v is not None else None, v, held))
    seen: dict[str, str] = {}
    for r in rows:  # the reports key rows by label
        if r.label in seen and seen[r.label] != r.attack:
            raise ValueError(f"attacks {seen[r.label]!r} and {r.attack!r} both make the row {r.label!r} "
                             f"(leave-one-out rows of X are 'ens-X without H'); run them in separate tables")
        seen.setdefault(r.label, r.attack)
    return rows


def build_row_attack(spec: RowSpec, model: nn.Module | None, seed: int, device, registry) -> Any:
    cls = registry[spec.attack]
    kw = dict(spec.kwargs)
    if "technique" in kw:
        kw["transforms"] = transforms_for(kw.pop("technique"))
    kw = crafting_defaults(cls, kw, seed=seed, device=device)
    from advdet.attacks.ensemble import ENSEMBLE_OPTIONS, SurrogateEnsemble
    from advdet.attacks.registry import build_attack

    if (spec.kind == "detector" and model is not None and not isinstance(model, SurrogateEnsemble)
            and any(k in kw for k in ENSEMBLE_OPTIONS) and not any(accepts(cls, k) for k in ENSEMBLE_OPTIONS)):
        model = SurrogateEnsemble([model], [spec.surrogate])  # ensemble options: a one-member ensemble

    return build_attack(spec.attack, model, **kw)


def sweep_values_of(rows: Sequence[RowSpec]) -> list:
    vals = []
    for r in rows:
        if r.sweep and r.sweep_value not in vals:
            vals.append(r.sweep_value)
    return vals
