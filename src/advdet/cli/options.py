"""The options that several commands share, defined once (typer ``Annotated`` aliases), and their parsers.

- ``--threads``: torch CPU threads (the root option, ``advdet --threads 1 CMD``; ``advdet demo`` takes it too);
- ``--device``: cuda or cpu;
- ``--weights``: one weights file (``WeightsFile``) or ``NAME=PATH`` per model (``WeightsMap``, a bare PATH
  with a single model), read by :func:`parse_weights`;
- ``--allow-untrained`` (alias ``--untrained``): random weights where no trained ones exist;
- ``--attack`` / ``--attacks``: the attack spec, ``NAME:KEY=VALUE,...`` (``advdet.attacks.spec``), and
  ``--set KEY=VALUE`` (``--set ATTACK.KEY=VALUE`` with several attacks), sugar for the same settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional, Sequence

import typer

__all__ = ["Threads", "Device", "WeightsFile", "WeightsMap", "AllowUntrained", "AttackSpecOption",
           "AttackListOption", "SettingsOption", "SPEC_HELP", "apply_threads", "parse_weights", "attack_spec",
           "attack_list", "budget_flags"]

SPEC_HELP = ("an attack spec NAME[:KEY=VALUE,...], e.g. rad:steps=5,technique=SI+MI (keys: the attack's "
             "hyper-parameters, docs/attacks.md; `advdet attack --list` names the attacks)")

Threads = Annotated[int, typer.Option("--threads", envvar="ADVDET_THREADS",
                                      help="torch CPU threads (0: torch's default). On a busy CPU, 1 is often "
                                           "several times faster.")]
Device = Annotated[Optional[str], typer.Option("--device", help="cuda or cpu (default: cuda when present).")]
WeightsFile = Annotated[Optional[Path], typer.Option("--weights", help="Weights file (default: the zoo's).")]
WeightsMap = Annotated[list[str], typer.Option("--weights", help="NAME=PATH weights for a model (repeatable); a "
                                                                 "bare PATH with a single model; default: the "
                                                                 "zoo's shipped weights.")]
AllowUntrained = Annotated[bool, typer.Option("--allow-untrained", "--untrained",
                                              help="Use randomly initialised models where no trained weights "
                                                   "exist (smoke runs, tests).")]
AttackSpecOption = Annotated[Optional[str], typer.Option("--attack", help=f"The attack: {SPEC_HELP}.")]
AttackListOption = Annotated[str, typer.Option("--attacks", help=f"Attacks, comma list; each {SPEC_HELP}.")]
SettingsOption = Annotated[list[str], typer.Option("--set", help="Attack setting KEY=VALUE (ATTACK.KEY=VALUE "
                                                                 "where the command takes several attacks), "
                                                                 "repeatable; the same keys and values as "
                                                                 "the spec's.")]


def apply_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when given (0 / None: torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def parse_weights(items: Sequence[str], models: Sequence[str], *, check_files: bool = True) -> dict[str, str]:
    """``--weights NAME=PATH`` (repeatable), or a bare PATH when only one model is named."""
    out: dict[str, str] = {}
    for item in items:
        if "=" in item:
            name, path = item.split("=", 1)
        elif len(models) == 1:
            name, path = models[0], item
        else:
            raise typer.BadParameter(f"--weights {item!r}: with several models use NAME=PATH")
        if not name or not path:
            raise typer.BadParameter(f"--weights expects NAME=PATH, got {item!r}")
        if name not in models:
            raise typer.BadParameter(f"--weights {item!r}: {name!r} is not one of the models "
                                     f"({', '.join(models)})")
        if check_files and not Path(path).is_file():
            raise typer.BadParameter(f"--weights {item!r}: {path}: file not found")
        out[name] = path
    return out


def attack_spec(text: str, settings: Sequence[str] = ()):
    """The spec of a one-attack command with its ``--set`` items laid over it (``AttackSpec``)."""
    from advdet.attacks.spec import AttackSpec, parse_settings

    spec = AttackSpec.parse(text)
    extra = parse_settings(settings, attack=spec.name)
    other = sorted(set(extra) - {spec.name})
    if other:
        from advdet.data.errors import OptionError

        raise OptionError(f"--set names {', '.join(other)}, but the attack is {spec.name!r}")
    return spec.with_settings(extra.get(spec.name, {}))


def attack_list(text: str | Sequence[str], settings: Sequence[str] = (), *, extra_names: Sequence[str] = (),
                allow_unknown: bool = False) -> tuple[list[str], dict[str, dict]]:
    """Names and ``{name: settings}`` of a comma list of specs, with ``--set ATTACK.KEY=VALUE`` laid over
    (``allow_unknown``: unknown bare names kept, for commands that skip them with a note)."""
    from advdet.attacks.spec import parse_attack_list, parse_settings

    specs = parse_attack_list(text, extra_names=extra_names, allow_unknown=allow_unknown)
    names = [s.name for s in specs]
    kwargs = {s.name: dict(s.kwargs) for s in specs if s.kwargs}
    for name, kw in parse_settings(settings, attack=names[0] if len(names) == 1 else None).items():
        kwargs.setdefault(name, {}).update(kw)
    return names, kwargs


def budget_flags(spec, **flags):
    """The spec with the ``--eps`` / ``--step`` / ``--steps`` flags that were given laid in; a key given both
    ways with different values is an error naming it."""
    from advdet.data.errors import OptionError

    given = {k: v for k, v in flags.items() if v is not None}
    for k, v in given.items():
        if k in spec.kwargs and spec.kwargs[k] != v:
            raise OptionError(f"attack {spec.name!r}: {k} given twice (--{k} {v:g} and {k}={spec.kwargs[k]} in "
                              f"the spec)")
    return spec.with_settings(given)
