"""``advdet reproduce rad|robustdet``: regenerate the analogues of both papers' tables from the shipped zoo,
resumably, with a verdict per claim computed from bootstrap intervals.

The steps are :mod:`advdet.bench.reproduce_steps`'s, the claims and verdicts
:mod:`advdet.bench.reproduce_claims`'s, the pages :mod:`advdet.bench.reproduce_pages`'s; this module runs a
reproduction: each step is one benchmark call (``transfer_matrix``, ``robustness_table`` or
``robustness_steps_sweep``) whose result is written atomically to ``OUT/<target>/<step>.json`` and skipped
when that file is present, so a killed run resumes at the first missing step and a finished step is never
computed (or lost) again. A step file made with other settings (images, seed, resamples, weights, ...) is
never overwritten: the run stops with an error naming it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from advdet.bench.reproduce_claims import held_out_goal, rad_claims, rad_goal
from advdet.bench.reproduce_pages import now_utc, write_page
from advdet.bench.reproduce_steps import (DEFAULT_LIMITS, FORMAT, TARGETS, Step, rad_steps, robustdet_steps,
                                          step_cost, step_groups, step_models)
from advdet.data.errors import AdvdetError

log = logging.getLogger(__name__)

#: decimals of the per-resample mAP50 values a robustness step keeps (1e-6 is far below the pages' 0.1 point)
SAMPLE_DIGITS = 6

__all__ = ["StaleStepError", "reproduce", "reproduce_command"]


class StaleStepError(AdvdetError):
    """A step file exists but was made with other settings; it is kept, the run stops."""


def _weights_fingerprint(name: str, models: Mapping | None) -> dict:
    """Which weights a model will use, before it is loaded (:func:`advdet.models.hub.provenance`): the zoo
    file and its sha256, ``given`` (a module passed in) or ``untrained``."""
    from advdet.models.hub import provenance

    return provenance(name, given=bool(models) and name in models).as_dict()


def _jsonify(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _config(target: str, step: Step, *, data: str, limit: int | None, seed: int, batch_size: int, n_boot: int,
            boot_seed: int, attack_kwargs: Mapping, weights: Mapping[str, dict]) -> dict:
    """What a step's numbers depend on; a step file with another config is stale."""
    return _jsonify({"format": FORMAT, "target": target, "step": step.name, "kind": step.kind, "params": step.params,
                     "data": data, "limit": limit, "seed": seed, "batch_size": batch_size, "n_boot": n_boot,
                     "boot_seed": boot_seed, "attack_kwargs": attack_kwargs,
                     "weights_sha256": {m: weights[m]["sha256"] or weights[m]["origin"] for m in step_models(step)}})


def _diff_keys(a: Mapping, b: Mapping) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _run_step(step: Step, *, data: str, limit: int | None, seed: int, batch_size: int, n_boot: int, boot_seed: int,
              device, models: Mapping | None, attack_kwargs: Mapping, allow_untrained: bool, progress: bool,
              ) -> tuple[dict, dict]:
    """Run one step; returns (JSON-ready result, derived claims)."""
    from advdet.bench.transfer_report import json_ready

    p = dict(step.params)
    common = dict(limit=limit, batch_size=batch_size, seed=seed, device=device, progress=progress, n_boot=n_boot,
                  boot_seed=boot_seed, allow_untrained=allow_untrained)
    derived: dict = {}
    if step.kind == "transfer":
        from advdet.bench.transfer import transfer_matrix

        res = transfer_matrix(p.pop("surrogates"), p.pop("attacks"), p.pop("victims"), data, models=models,
                              attack_kwargs=attack_kwargs, examples=0, relevance=False, **p, **common)
        samples = res.get("_bootstrap_samples")
        if step.name == "table3" and samples:
            derived = {"claims": rad_claims(res, samples), "goal": rad_goal(res, samples)}
        elif step.params.get("leave_one_out") and samples:
            derived = {"held_out_goal": held_out_goal(res, samples)}
        return json_ready(res), derived
    from advdet.bench.robustness import robustness_steps_sweep, robustness_table

    names = p.pop("models")
    dets = {k: v for k, v in (models or {}).items() if k in names} or None
    samples: dict = {}
    fn = robustness_table if step.kind == "robustness" else robustness_steps_sweep
    res = fn(names, p.pop("attacks"), data, detectors=dets, attack_kwargs=dict(attack_kwargs) or None,
             samples_out=samples, **p, **common)
    if samples:  # the page gathers the models' steps and derives the intervals and claims from these
        derived = {"samples": {m: {k: [round(float(v), SAMPLE_DIGITS) for v in col] for k, col in cols.items()}
                               for m, cols in samples["cells"].items()}}
    return json_ready(res), derived


def reproduce_command(target: str, *, limit: int | None, out: str | Path, steps: Sequence[str] | None = None,
                      extra: Sequence[str] = (), jobs: int = 1) -> str:
    """The command line that makes (or resumes) a reproduction, as the page states it (with ``--jobs N``
    when N > 1: it sets the page's wall time)."""
    parts = ["advdet", "reproduce", target]
    if limit is not None:
        parts += ["--limit", str(limit)]
    parts += ["--out", str(out)]
    if steps:
        parts += ["--steps", ",".join(steps)]
    if jobs > 1:
        parts += ["--jobs", str(jobs)]
    return " ".join(list(parts) + list(extra))


def _compute_step(step: Step, path: Path, cfg: dict, run_kw: dict, threads: int | None = None) -> tuple[str, float]:
    """Run one step and write its file atomically (in this process or in a worker of ``jobs``);
    returns (name, seconds)."""
    from advdet.data.io import atomic_write_json

    if threads:
        import torch

        torch.set_num_threads(threads)
    log.info("%s: computing (%s)", step.name, step.title)
    ts = time.perf_counter()
    result, derived = _run_step(step, **run_kw)
    secs = round(time.perf_counter() - ts, 3)
    atomic_write_json(path, {"format": FORMAT, "step": step.name, "title": step.title, "config": cfg,
                             "seconds": secs, "finished_utc": now_utc(), "result": result, "derived": derived},
                      indent=1)
    return step.name, secs


def reproduce(target: str, out: str | Path = "docs/results", *, limit: int | None = None, data: str = "shapes-val",
              steps: Sequence[str] | None = None, seed: int = 0, batch_size: int = 8, n_boot: int = 1000,
              boot_seed: int = 0, device=None, models: Mapping | None = None, plan: Sequence[Step] | None = None,
              attack_kwargs: Mapping[str, dict] | None = None, allow_untrained: bool = False,
              progress: bool = True, command: str | None = None, jobs: int = 1,
              on_step: Callable[[str, str, float], None] | None = None) -> dict:
    """Make or resume the reproduction ``target`` (``rad`` or ``robustdet``) in ``out``.

    Every step of ``plan`` (default :func:`rad_steps` / :func:`robustdet_steps`; ``steps`` picks some by name
    or by group: ``fig7_eps`` is its three steps)
    is loaded from ``out/<target>/<step>.json`` when present (its settings must match: ``StaleStepError``
    otherwise), else computed and written atomically. Then ``out/<target>.md`` and ``out/<target>.json``
    (command, weights and their sha256, wall time, verdicts, tables; figures in ``out/<target>/``) are
    written from every step file present. ``jobs`` > 1: the missing steps run in that many worker processes
    at once (spawned, each with ``torch threads // jobs`` threads, at least 1; the costliest first by
    :func:`step_cost`); every step is seeded on its own, so its file is the same as in one process.
    ``limit``: images (default :data:`DEFAULT_LIMITS`). ``models``:
    already built models by name (tests: tiny random models); ``on_step(name, status, seconds)`` is called
    per step with ``computed`` or ``reused``. Returns the page's JSON (plus ``md`` and ``json`` paths).
    """
    if target not in TARGETS:
        raise AdvdetError(f"unknown reproduction {target!r}; choose one of {', '.join(TARGETS)}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1 (the verdicts need bootstrap intervals), got {n_boot}")
    if limit is None:
        limit = DEFAULT_LIMITS[target]
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    t0 = time.perf_counter()
    out = Path(out)
    all_steps = list(plan) if plan is not None else (rad_steps() if target == "rad" else robustdet_steps())
    known = [s.name for s in all_steps]
    picked = set(known)
    if steps:
        groups = {g: names for g, names in step_groups(all_steps).items() if g not in known}
        bad = [s for s in steps if s not in known and s not in groups]
        if bad:
            also = f" (or a group: {', '.join(groups)})" if groups else ""
            raise AdvdetError(f"unknown step {', '.join(bad)} of {target}; its steps are {', '.join(known)}{also}")
        picked = {n for s in steps for n in groups.get(s, [s])}
    command = command or reproduce_command(target, limit=limit, out=out, steps=steps, jobs=jobs)
    attack_kwargs = {k: dict(v) for k, v in (attack_kwargs or {}).items()}
    if data in ("shapes-val", "shapes-train"):
        from advdet.data.shapes import ensure_default_shapes

        ensure_default_shapes()
    names = list(dict.fromkeys(n for s in all_steps for n in step_models(s)))
    weights = {n: _weights_fingerprint(n, models) for n in names}
    from advdet.data.io import read_json

    status: dict[str, str] = {}
    missing: list[tuple[Step, Path, dict]] = []
    for step in all_steps:  # every step file present, picked or not, goes on the page: all must match
        path = out / target / f"{step.name}.json"
        cfg = _config(target, step, data=data, limit=limit, seed=seed, batch_size=batch_size, n_boot=n_boot,
                      boot_seed=boot_seed, attack_kwargs=attack_kwargs, weights=weights)
        if not path.is_file():
            if step.name in picked:
                missing.append((step, path, cfg))
            continue
        old = read_json(path)
        if old.get("config") != cfg:
            keys = _diff_keys(old.get("config") or {}, cfg)
            raise StaleStepError(f"{path}: made with other settings ({', '.join(keys)} differ); it is kept. "
                                 "Pass another --out, or move the file away to recompute it")
        if step.name not in picked:
            continue
        status[step.name] = "reused"
        log.info("%s: reusing %s", step.name, path)
        if on_step is not None:
            on_step(step.name, "reused", float(old.get("seconds", 0.0)))
    run_kw = dict(data=data, limit=limit, seed=seed, batch_size=batch_size, n_boot=n_boot, boot_seed=boot_seed,
                  device=device, models=models, attack_kwargs=attack_kwargs, allow_untrained=allow_untrained,
                  progress=progress)

    def done(name: str, secs: float) -> None:
        status[name] = "computed"
        if on_step is not None:
            on_step(name, "computed", secs)
        write_page(target, out, all_steps, status, weights, command, limit, t0)  # progress is visible

    if jobs > 1 and len(missing) > 1:
        _compute_parallel(missing, run_kw, jobs, done)
    else:
        for step, path, cfg in missing:
            done(*_compute_step(step, path, cfg, run_kw))
    return write_page(target, out, all_steps, status, weights, command, limit, t0)


def _compute_parallel(missing: Sequence[tuple[Step, Path, dict]], run_kw: dict, jobs: int,
                      done: Callable[[str, float], None]) -> None:
    """The missing steps in ``jobs`` spawned worker processes, the costliest first; ``done`` as each ends.
    A failing step stops the run after the steps already running have ended (their files are kept)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    import torch

    workers = min(jobs, len(missing))
    threads = max(1, torch.get_num_threads() // workers)
    order = sorted(missing, key=lambda m: -step_cost(m[0]))
    kw = {**run_kw, "progress": False}  # several progress bars on one terminal would garble each other
    log.info("%d steps in %d worker processes (%d torch threads each)", len(order), workers, threads)
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_compute_step, step, path, cfg, kw, threads) for step, path, cfg in order]
        try:
            for fut in as_completed(futures):
                done(*fut.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # the running steps end and keep their files
            raise
