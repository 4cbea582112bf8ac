"""The attacks layer: the ``Attack`` base (``base``), gradient transforms SI/DI/TI/MI (``transforms``),
loss-based detector attacks (PGD, A_cls, A_loc, CWA, MTD), DAG, Dfool, Loc/Size, the Gaussian ablation,
the feature-level OSFD, ensembles of surrogates for every attack (``ensemble``), classifier transfer
baselines, quantisation-safe saving (``quantize``), the registry and the one attack grammar (``spec``:
``rad:steps=5,technique=SI+MI``)."""

from advdet.attacks.base import Attack, eval_mode
from advdet.attacks.batches import letterbox_mask, nonzero_mask
from advdet.attacks.classifier import ClassifierMIDIPGD, ClassifierMITIPGD, ClassifierPGD, ClassifierSIPGD
from advdet.attacks.cwa import CWA
from advdet.attacks.dag import DAG, DAGEps, adversarial_label_map
from advdet.attacks.dfool import Dfool
from advdet.attacks.ensemble import EnsembleAttack, EnsemblePGD, SurrogateEnsemble
from advdet.attacks.gaussian import GaussianNoise
from advdet.attacks.loc_shift import LocShift
from advdet.attacks.mtd import MTD
from advdet.attacks.osfd import OSFD
from advdet.attacks.pgd import PGD, ClsAttack, LocAttack
from advdet.attacks.quantize import load_png, quantize_adv, save_adversarial_png, save_png, to_uint8
from advdet.attacks.registry import ATTACKS, attacks_of_kind, build_attack, list_attacks, register_attack
from advdet.attacks.spec import AttackSpec, parse_attack_list, parse_settings, transforms_for
from advdet.attacks.size import Size
from advdet.attacks.transforms import DI, MI, SI, TI, GradientTransform, InputTransform, gaussian_kernel

__all__ = [
    "Attack", "eval_mode", "letterbox_mask", "nonzero_mask",
    "PGD", "ClsAttack", "LocAttack", "CWA", "MTD", "DAG", "DAGEps", "adversarial_label_map", "Dfool",
    "LocShift", "Size", "GaussianNoise", "OSFD", "SurrogateEnsemble", "EnsembleAttack", "EnsemblePGD",
    "ClassifierPGD", "ClassifierSIPGD", "ClassifierMIDIPGD", "ClassifierMITIPGD",
    "GradientTransform", "InputTransform", "SI", "DI", "TI", "MI", "gaussian_kernel",
    "to_uint8", "quantize_adv", "save_png", "load_png", "save_adversarial_png",
    "ATTACKS", "attacks_of_kind", "build_attack", "list_attacks", "register_attack",
    "AttackSpec", "parse_attack_list", "parse_settings", "transforms_for",
]


def __getattr__(name: str):
    if name == "CLASSIFIER_ATTACKS":  # deprecated side list (see advdet.attacks.registry)
        from advdet.attacks import registry

        return registry.__getattr__(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
