"""The attack registry: ``ATTACKS`` (name -> class, each with a one-line ``description`` for
``advdet attack --list``) and ``build_attack(name, model, **kw)``.

Names:

- loss-based detector attacks (RobustDet / MTD / CWAT; eps 8, step 8, 20 steps, sign):
  ``pgd`` (total loss), ``cls`` (A_cls), ``loc`` (A_loc), ``cwa``, ``mtd``;
- dense detector attacks: ``dag`` (Xie et al., reference settings), ``dag-eps`` (RAD Table 3);
- attacks on the clean detections (RAD Tables 1 and 3; eps 16, step 2, 10 steps, eq. 5):
  ``dfool``, ``loc-shift`` (RAD's "Localization"; ``loc`` is A_loc), ``size``;
- ``gaussian``: RAD's noise ablation;
- ``osfd``: OSFD's feature-level transfer baseline (Ding et al., AAAI 2024; ``attacks/osfd.py``; eps 16,
  step 2, 10 steps, MI, sign), on the backbone maps each family declares (``Detector.feature_layers``);
- ``ens-pgd``: sign-PGD on an ensemble's detection losses, each member's gradient L1-normalised
  (``attacks/ensemble.py``; ``pgd`` on an ensemble with ``normalize=True``; its model is a
  ``SurrogateEnsemble``, or one detector);
- classifier transfer baselines (RAD Table 3; eps 16, step 2, 10 steps, sign): ``cls-pgd``,
  ``cls-si-pgd``, ``cls-mi-di-pgd``, ``cls-mi-ti-pgd``.

Other layers add attacks with ``register_attack`` (RAD registers ``rad``). What an attack is, beyond its
constructor, is a class attribute: ``surrogate_kind`` (``"classifier"`` for the classifier baselines) and
``budget`` (``"eps=step"`` for the PGD family of the robustness table); ``dag-xie`` is an old alias of
``dag``. Commands take an attack as one spec string, ``NAME:KEY=VALUE,...`` (``attacks/spec.py``).

Ensembles: ``build_attack(name, SurrogateEnsemble([...]), **kw)`` returns an ``EnsembleAttack`` that runs
``name`` on every member and averages their objectives (``attacks/ensemble.py``; ensemble options
``weights=`` and ``normalize=`` next to the attack's own).
"""

from __future__ import annotations

import inspect
from typing import Any

from advdet.attacks.base import Attack
from advdet.attacks.classifier import ClassifierMIDIPGD, ClassifierMITIPGD, ClassifierPGD, ClassifierSIPGD
from advdet.attacks.cwa import CWA
from advdet.attacks.dag import DAG, DAGEps
from advdet.attacks.dag_robustdet import RobustDetDAG
from advdet.attacks.dfool import Dfool
from advdet.attacks.ensemble import EnsemblePGD, SurrogateEnsemble
from advdet.attacks.gaussian import GaussianNoise
from advdet.attacks.loc_shift import LocShift
from advdet.attacks.mtd import MTD
from advdet.attacks.osfd import OSFD
from advdet.attacks.pgd import PGD, ClsAttack, LocAttack
from advdet.attacks.rad import RAD
from advdet.attacks.size import Size
from advdet.data.errors import OptionError

__all__ = ["ATTACKS", "build_attack", "register_attack", "list_attacks", "attacks_of_kind"]

ATTACKS: dict[str, type[Attack]] = {}


def attacks_of_kind(kind: str) -> list[str]:
    """Registered names whose ``surrogate_kind`` is ``kind`` (``"detector"``, ``"classifier"``, ``"none"``)."""
    return [n for n, c in ATTACKS.items() if c.surrogate_kind == kind]


def __getattr__(name: str):
    if name == "CLASSIFIER_ATTACKS":  # the old side list; the class attribute ``surrogate_kind`` says it now
        import warnings

        warnings.warn("CLASSIFIER_ATTACKS is deprecated: use attacks_of_kind('classifier') or "
                      "cls.surrogate_kind", DeprecationWarning, stacklevel=2)
        return set(attacks_of_kind("classifier"))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_attack(cls: type[Attack], name: str | None = None, *, classifier: bool = False,
                    replace: bool = False) -> type[Attack]:
    """Add an attack class under ``name`` (default ``cls.name``); usable as a decorator. ``classifier=True``
    is the old form of ``surrogate_kind = "classifier"`` on the class (it must agree)."""
    name = name or cls.name
    if not (isinstance(cls, type) and issubclass(cls, Attack)):
        raise TypeError(f"register_attack: {cls!r} is not an Attack subclass")
    if name in ATTACKS and not replace and ATTACKS[name] is not cls:
        raise ValueError(f"attack {name!r} is already registered ({ATTACKS[name].__name__})")
    if not getattr(cls, "description", ""):
        raise ValueError(f"attack {name!r} needs a one-line description")
    if classifier and cls.surrogate_kind != "classifier":
        raise ValueError(f"attack {name!r}: classifier=True but {cls.__name__}.surrogate_kind is "
                         f"{cls.surrogate_kind!r}; declare surrogate_kind = 'classifier' on the class")
    ATTACKS[name] = cls
    return cls


for _cls in (PGD, ClsAttack, LocAttack, CWA, MTD, DAG, DAGEps, Dfool, LocShift, Size, GaussianNoise):
    register_attack(_cls)
for _cls in (ClassifierPGD, ClassifierSIPGD, ClassifierMIDIPGD, ClassifierMITIPGD):
    register_attack(_cls)  # surrogate_kind = "classifier"
register_attack(RobustDetDAG)  # DAG as RobustDet's Table 1 runs it (attacks/dag_robustdet.py)
register_attack(RAD)  # RAD, the Relevance Attack on Detectors (attacks/rad.py)
register_attack(EnsemblePGD)  # ensembles of surrogates (attacks/ensemble.py)
register_attack(OSFD)  # feature-level transfer baseline (attacks/osfd.py)


def list_attacks() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered attack, in registration order."""
    return [(n, c.description) for n, c in ATTACKS.items()]


def build_attack(name: str, model: Any, **kw: Any) -> Attack:
    """Instantiate the attack ``name`` on ``model`` with keyword hyper-parameters (the class defaults
    otherwise). Values given as text are read by the spec grammar (``attacks/spec.py``: ``steps="5"``,
    ``transforms="SI+MI"``, alias ``technique=``). An unknown name raises ``UnknownNameError`` (a
    ``KeyError``), an unknown, missing or ill-typed hyper-parameter ``OptionError`` (a ``TypeError``), both
    naming it; a ``TypeError`` from inside the attack's ``__init__`` is a bug and propagates as it is. A
    ``SurrogateEnsemble`` model gets an ``EnsembleAttack`` of ``name`` (``weights=`` and ``normalize=``
    are its options)."""
    from advdet.attacks.spec import build_kwargs, check_kwargs, resolve_name

    name = resolve_name(name, ATTACKS)
    cls = ATTACKS[name]
    if isinstance(model, SurrogateEnsemble) and not getattr(cls, "ensemble_native", False):
        from advdet.attacks.ensemble import EnsembleAttack

        return EnsembleAttack(model, attack=name, **check_kwargs(name, kw, ATTACKS))  # members build their own
    kw = build_kwargs(name, kw, ATTACKS)
    try:
        inspect.signature(cls).bind(model, **kw)
    except TypeError as err:
        raise OptionError(f"attack {name!r}: {err}") from None
    return cls(model, **kw)
