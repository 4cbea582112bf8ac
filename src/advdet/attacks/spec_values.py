"""The values of the attack grammar (``advdet.attacks.spec``): splitting a spec at its top-level commas,
an attack's constructor keywords with their annotations, and text read as a value of an annotation."""

from __future__ import annotations

import collections.abc
import functools
import inspect
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

from advdet.data.errors import OptionError

__all__ = ["Param", "attack_parameters", "accepts", "convert", "split_top"]

_NONE = ("none", "null")
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


# ------------------------------------------------------------------------------------------ splitting
def split_top(text: str, seps: str = ",") -> list[str]:
    """``text`` split at ``seps`` outside ``()``, ``[]``, ``{}`` and quotes."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch in seps and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


# ------------------------------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class Param:
    """One keyword of an attack's constructor: its annotation (``Any`` when unknown) and default."""

    name: str
    annotation: Any
    default: Any


def _init_chain(cls: type) -> list:
    """The ``__init__`` functions whose keywords ``cls`` accepts: its own, and the base's it forwards
    ``**kw`` to (``DAGEps`` -> ``DAG``)."""
    out = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        out.append(init)
        sig = inspect.signature(init)
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            break
    return out


@functools.lru_cache(maxsize=None)
def attack_parameters(cls: type) -> dict[str, Param]:
    """The keyword parameters of an attack class (the model argument left out), with their annotations;
    a class's ``fixed_options`` (keywords of a base that it sets itself) are left out."""
    fixed = set(getattr(cls, "fixed_options", ()))
    params: dict[str, Param] = {}
    for init in _init_chain(cls):
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # an annotation that names a type only imported for type checking
            hints = {}
        for i, (name, p) in enumerate(inspect.signature(init).parameters.items()):
            if i < 2 and p.kind is p.POSITIONAL_OR_KEYWORD:  # self, model
                continue
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or name in params or name in fixed:
                continue
            params[name] = Param(name, hints.get(name, Any), p.default)
    return params


def accepts(cls: type, key: str) -> bool:
    """Whether attack class ``cls`` takes the keyword ``key`` (``technique`` counts as ``transforms``)."""
    key = "transforms" if key == "technique" else key
    return key in attack_parameters(cls)


# ------------------------------------------------------------------------------------------ values
def convert(attack: str, key: str, raw: str, ann: Any) -> Any:
    """``raw`` (text) as a value of type ``ann``; OptionError naming attack, key and value otherwise."""
    text = raw.strip()

    def bad(what: str) -> OptionError:
        return OptionError(f"attack {attack!r}: {key}={text!r} is not {what}")

    if ann is Any or ann is inspect.Parameter.empty:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return None if text.lower() in _NONE else text
    origin = typing.get_origin(ann)
    if origin in (Union, types.UnionType):
        args = typing.get_args(ann)
        if type(None) in args and text.lower() in _NONE:
            return None
        rest = [a for a in args if a is not type(None)]
        def order(a: Any) -> int:  # "8" is the int 8, "auto" the text, "[a,b]" a list, "a" the text
            if typing.get_origin(a) in (list, tuple, collections.abc.Sequence):
                return 0 if text.startswith("[") else 2
            return 1 if a is str else 0

        for a in sorted(rest, key=order):
            try:
                return convert(attack, key, text, a)
            except OptionError:
                continue
        raise bad(" or ".join(_type_name(a) for a in args))
    if origin is Literal:
        choices = typing.get_args(ann)
        for c in choices:
            if str(c) == text or (isinstance(c, str) and c.lower() == text.lower()):
                return c
        raise bad(f"one of {', '.join(map(str, choices))}")
    if ann is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise bad("a bool (true or false)")
    if ann is int:
        try:
            return int(text)
        except ValueError:
            raise bad("an int") from None
    if ann is float:
        try:
            return float(text)
        except ValueError:
            raise bad("a number") from None
    if ann is str:
        return text
    if origin in (list, tuple, collections.abc.Sequence):
        try:
            val = json.loads(text)
        except json.JSONDecodeError:
            val = split_top(text.strip("[]()"))
        if not isinstance(val, list):
            val = [val]
        inner = typing.get_args(ann)[:1]
        return [convert(attack, key, str(v), inner[0]) if inner and inner[0] is not Any else v for v in val]
    raise OptionError(f"attack {attack!r}: {key} takes a {_type_name(ann)} object; it cannot be set in a spec")


def _type_name(ann: Any) -> str:
    if ann is type(None):
        return "none"
    if typing.get_origin(ann) is Literal:
        return " or ".join(map(str, typing.get_args(ann)))
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


