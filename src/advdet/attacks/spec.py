"""The one attack grammar: ``NAME[:KEY=VALUE,KEY=VALUE,...]``, e.g. ``rad:steps=5,technique=SI+MI``.

Every command that takes an attack takes this spec (``advdet attack --attack``, ``advdet dataset
--attack``, ``advdet bench transfer --attacks``, ``advdet bench robustness --attacks``, ``advdet demo
--attacks``); a list of attacks is the specs joined by commas (``rad:steps=5,technique=SI,dfool``: a
part with ``=`` and no ``:`` before it continues the attack before it) or by ``;``.

Values are checked against the attack's constructor (its annotations) and converted: ``int``,
``float``, ``bool`` (true/false/yes/no/1/0), ``None`` (``none``/``null`` where the parameter is
optional), ``Literal`` choices, ``str``; a parameter without a usable annotation takes a JSON value
(``weights=[2,1,1]``) or the text. ``transforms=`` (alias ``technique=``) takes the update technique of
RAD Table 2: ``none``, ``SI``, ``DI``, ``TI``, ``MI`` or ``+``-joined combinations (``SI+MI``), each
with optional settings (``SI(scales=5)+MI(mu=0.5)``). Commas inside ``()`` and ``[]`` do not split.

A wrong spec is one line naming the attack and the bad key or value, e.g. ``attack 'rad': unknown
option 'stepz'; valid: eps, step, steps, ...``.

``--set KEY=VALUE`` (``--set ATTACK.KEY=VALUE`` where a command takes several attacks) is kept as sugar
for the same keys, parsed by the same rules (:func:`parse_settings`).

What an attack is, beyond its constructor, is declared on its class: ``surrogate_kind`` (``detector``,
``classifier`` or ``none``) and ``budget`` (``eps``, ``eps=step`` or ``none``; see ``Attack``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from advdet.attacks.spec_values import Param, accepts, attack_parameters, convert, split_top
from advdet.data.errors import OptionError, UnknownNameError

__all__ = ["AttackSpec", "parse_attack_list", "parse_settings", "transforms_for", "attack_parameters",
           "accepts", "check_kwargs", "ENSEMBLE_OPTIONS", "ALIASES", "resolve_name"]

#: the options of an ensemble of surrogates, accepted next to every detector attack's own
ENSEMBLE_OPTIONS = ("weights", "normalize")
#: old names kept working: name -> (current name, note). ``dag-xie`` was the robustness table's name
#: for Xie's DAG while ``dag`` there meant RobustDet's; ``dag`` is Xie's DAG everywhere now.
ALIASES: dict[str, tuple[str, str]] = {
    "dag-xie": ("dag", "'dag-xie' is deprecated: Xie's DAG is 'dag' everywhere "
                       "(RobustDet's DAG column is 'dag-robustdet')"),
}


def _registry(registry: Mapping[str, type] | None) -> Mapping[str, type]:
    if registry is not None:
        return registry
    from advdet.attacks.registry import ATTACKS

    return ATTACKS


def resolve_name(name: str, registry: Mapping[str, type] | None = None, *, extra: Iterable[str] = ()) -> str:
    """The registry name of ``name`` (an alias logs its deprecation note); an unknown name raises
    ``UnknownNameError`` with the known ones. ``extra``: names a command accepts besides attacks."""
    import logging

    reg = _registry(registry)
    name = name.strip()
    if name in ALIASES and name not in reg:
        new, note = ALIASES[name]
        logging.getLogger(__name__).warning(note)
        name = new
    if name not in reg and name not in extra:
        known = ", ".join([*extra, *reg])
        raise UnknownNameError(f"unknown attack {name!r}; known: {known} (advdet attack --list)")
    return name


def _starts_spec(token: str) -> bool:
    """A list item that names an attack (``rad``, ``rad:steps=5``), not a ``key=value`` of the one before."""
    eq = token.find("=")
    colon = token.find(":")
    return eq < 0 or 0 <= colon < eq


def transforms_for(technique: Any) -> list:
    """Fresh transform instances for an update technique: ``none``, ``SI``, ``DI``, ``TI``, ``MI``, ``+``-joined
    combinations (``SI+MI``) and settings in parentheses (``SI(scales=5)+MI(mu=0.5)``); RAD Table 2
    settings are the transforms' defaults. A list of transforms is returned as it is."""
    from advdet.attacks.transforms import DI, MI, SI, TI, GradientTransform

    if isinstance(technique, (list, tuple)):
        if all(isinstance(t, GradientTransform) for t in technique):
            return list(technique)
        technique = "+".join(map(str, technique))
    table = {"SI": SI, "DI": DI, "TI": TI, "MI": MI}
    name = str(technique).strip()
    if name.lower() in ("none", "", "[]"):
        return []
    out = []
    for part in split_top(name, "+"):
        head, paren, args = part.partition("(")
        key = head.strip().upper()
        if key not in table:
            raise OptionError(f"unknown update technique {part!r}; choose from none, SI, DI, TI, MI "
                              "(or SI+MI, SI(scales=5) ...)")
        kw = {}
        if paren:
            if not args.endswith(")"):
                raise OptionError(f"update technique {part!r}: missing ')'")
            try:
                kw = _parse_pairs(key, args[:-1], attack_parameters(table[key]))
            except OptionError as err:
                raise OptionError(str(err).replace(f"attack {key!r}", f"transform {key}", 1)) from None
        out.append(table[key](**kw))
    return out


def _parse_pairs(attack: str, text: str, params: Mapping[str, Param], *, extra: Sequence[str] = ()) -> dict:
    """``key=value,key=value`` checked and converted against ``params``."""
    out: dict[str, Any] = {}
    for item in split_top(text):
        if not item:
            continue
        key, eq, val = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise OptionError(f"attack {attack!r}: expected KEY=VALUE, got {item!r}")
        out[key] = _value(attack, key, val, params, extra)
    return out


def _value(attack: str, key: str, raw: Any, params: Mapping[str, Param], extra: Sequence[str] = ()) -> Any:
    if key in ("transforms", "technique") and "transforms" in params:
        if isinstance(raw, str):
            try:
                transforms_for(raw)  # checked now; built fresh by build_attack
            except (OptionError, TypeError, ValueError) as err:
                raise OptionError(f"attack {attack!r}: {key}={raw.strip()!r}: {err}") from None
            return raw.strip()
        return raw
    if key not in params and key not in extra:
        valid = ", ".join([*params, *extra])
        raise OptionError(f"attack {attack!r}: unknown option {key!r}; valid: {valid}")
    if not isinstance(raw, str):
        return raw
    if key in params:
        return convert(attack, key, raw, params[key].annotation)
    return convert(attack, key, raw, Any)


def _extra_options(cls: type) -> tuple[str, ...]:
    """Keys an attack takes besides its constructor's: the ensemble options of detector attacks."""
    if getattr(cls, "surrogate_kind", "detector") == "detector" and not getattr(cls, "ensemble_native", False):
        return ENSEMBLE_OPTIONS
    return ()


def check_kwargs(name: str, kwargs: Mapping[str, Any], registry: Mapping[str, type] | None = None) -> dict:
    """``kwargs`` for attack ``name`` checked against its constructor: text values converted by the rules
    of the grammar, other values kept; ``technique`` becomes ``transforms`` (still text). OptionError
    naming the attack and the key for an unknown key or a bad value."""
    cls = _registry(registry)[name]
    params = attack_parameters(cls)
    out: dict[str, Any] = {}
    for key, raw in kwargs.items():
        val = _value(name, key, raw, params, _extra_options(cls))
        key = "transforms" if key == "technique" and "transforms" in params else key
        if key in out and key == "transforms":
            raise OptionError(f"attack {name!r}: give transforms= or technique=, not both")
        out[key] = val
    return out


def build_kwargs(name: str, kwargs: Mapping[str, Any], registry: Mapping[str, type] | None = None) -> dict:
    """:func:`check_kwargs`, then the transforms as fresh instances: the keywords for the constructor."""
    out = check_kwargs(name, kwargs, registry)
    if "transforms" in out and out["transforms"] is not None:
        out["transforms"] = transforms_for(out["transforms"])
    return out


# ------------------------------------------------------------------------------------------ the spec
@dataclass(frozen=True)
class AttackSpec:
    """An attack name and its checked keyword settings, parsed from ``NAME[:KEY=VALUE,...]``.

    ``kwargs`` are JSON-ready (``transforms`` stays the technique text, built by ``build``)."""

    name: str
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, registry: Mapping[str, type] | None = None, *,
              extra_names: Iterable[str] = ()) -> "AttackSpec":
        """``"rad:steps=5,technique=SI+MI"`` -> ``AttackSpec("rad", {"steps": 5, "transforms": "SI+MI"})``.
        ``extra_names``: names the caller accepts without settings (``clean`` in a robustness table)."""
        text = str(text).strip()
        head, colon, rest = text.partition(":")
        extra_names = tuple(extra_names)
        name = resolve_name(head, registry, extra=extra_names)
        if name in extra_names and name not in _registry(registry):
            if rest.strip():
                raise OptionError(f"{name!r} takes no settings, got {text!r}")
            return cls(name, {})
        kw = _parse_pairs(name, rest, attack_parameters(_registry(registry)[name]),
                          extra=_extra_options(_registry(registry)[name])) if colon else {}
        return cls(name, check_kwargs(name, kw, registry))

    def with_settings(self, settings: Mapping[str, Any], registry: Mapping[str, type] | None = None) -> "AttackSpec":
        """A copy with ``settings`` (text or typed) checked and laid over the spec's own."""
        if not settings:
            return self
        return AttackSpec(self.name, {**self.kwargs, **check_kwargs(self.name, settings, registry)})

    def build(self, model: Any, **defaults: Any):
        """The attack on ``model``: ``defaults`` (e.g. a command's eps or seed), the spec's settings over them."""
        from advdet.attacks.registry import build_attack

        return build_attack(self.name, model, **{**defaults, **self.kwargs})

    def __str__(self) -> str:
        if not self.kwargs:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_text(v)}" for k, v in self.kwargs.items())


def _text(v: Any) -> str:
    if isinstance(v, str):
        return v
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v, separators=(",", ":"))


def parse_attack_list(text: str | Sequence[str], registry: Mapping[str, type] | None = None, *,
                      extra_names: Iterable[str] = (), allow_unknown: bool = False) -> list[AttackSpec]:
    """A list of specs: ``"rad:steps=5,technique=SI,dfool;loc-shift:step=1"`` -> three specs (a comma part
    with ``=`` and no ``:`` before it continues the spec before it). A list of strings is read item by
    item, each itself such a list. An attack listed twice is an error. ``allow_unknown``: an unknown name
    without settings is kept as it is (for callers that skip unavailable attacks with a note)."""
    items = [text] if isinstance(text, str) else list(text)
    groups: list[str] = []
    for item in items:
        for chunk in split_top(str(item), ";"):
            for token in split_top(chunk):
                if not token:
                    continue
                if _starts_spec(token) or not groups:
                    groups.append(token)
                else:
                    sep = "," if ":" in groups[-1] else ":"
                    groups[-1] += sep + token
    reg = _registry(registry)
    specs = []
    for g in groups:
        head = g.partition(":")[0].strip()
        if allow_unknown and ":" not in g and head not in reg and head not in ALIASES:
            specs.append(AttackSpec(head, {}))
        else:
            specs.append(AttackSpec.parse(g, registry, extra_names=extra_names))
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise OptionError(f"attack listed twice: {', '.join(dup)} (give one spec per attack)")
    return specs


def parse_settings(items: Sequence[str], *, attack: str | None = None,
                   registry: Mapping[str, type] | None = None) -> dict[str, dict]:
    """The ``--set`` sugar: ``KEY=VALUE`` (the one ``attack``) or ``ATTACK.KEY=VALUE`` items ->
    ``{attack: {key: typed value}}``, checked as a spec's settings."""
    raw: dict[str, dict[str, str]] = {}
    for item in items:
        key, eq, val = str(item).partition("=")
        key = key.strip()
        if not eq or not key:
            raise OptionError(f"--set expects KEY=VALUE, got {item!r}")
        name, dot, param = key.rpartition(".") if "." in key else ("", "", key)
        if not dot:
            if attack is None:
                raise OptionError(f"--set expects ATTACK.KEY=VALUE here (several attacks), got {item!r}")
            name = attack
        if not name or not param:
            raise OptionError(f"--set expects ATTACK.KEY=VALUE, got {item!r}")
        raw.setdefault(resolve_name(name, registry), {})[param] = val
    return {name: check_kwargs(name, kw, registry) for name, kw in raw.items()}
