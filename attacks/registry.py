"""Attacks and experiments by name, so the CLI and the demo find them without a list to keep in sync.

Two kinds of entry, both registered by the module that implements them
(adding an attack touches nothing else):

* an **attack** runs on a saved protocol run: ``run(run_dir, **options)``
  reads only what its adversary received (that party's transcript in
  ``run_dir/transcripts/`` plus the public plan) and returns scorecard rows;
* an **experiment** produces the runs it needs (real services over gRPC) and
  attacks them, possibly over a sweep: ``run(out_dir, *, quick, seed,
  progress, runs=None)`` returns scorecard rows and writes its figures under
  ``out_dir``. ``runs`` maps a protocol name to the directory of a run that
  already exists (the demo passes its own runs); an experiment uses them
  where they fit and otherwise starts the runs it needs.

A scorecard row uses DESIGN.md's vocabulary::

    {"attack": "gradient_inversion", "protocol": "secagg", "adversary": "coordinator",
     "metrics": {"psnr_db": 31.2, "n_clients": 4, ...}, "baseline": {"psnr_db": 11.0, ...}}
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Attack:
    name: str
    adversary: str
    protocols: tuple[str, ...]
    summary: str
    run: Callable[..., list[dict]]


@dataclass(frozen=True)
class Experiment:
    name: str
    summary: str
    run: Callable[..., list[dict]]
    # rough minutes on 2 cores, quick and full (shown in --help and progress)
    minutes: tuple[float, float] = (1.0, 5.0)
    attacks: tuple[str, ...] = field(default=())


ATTACKS: dict[str, Attack] = {}
EXPERIMENTS: dict[str, Experiment] = {}


def attack(name: str, *, adversary: str, protocols: tuple[str, ...], summary: str):
    """Register ``fn(run_dir: Path, **options) -> list[dict]`` as attack ``name``."""
    def deco(fn):
        ATTACKS[name] = Attack(name, adversary, tuple(protocols), summary, fn)
        return fn
    return deco


def experiment(name: str, *, summary: str, minutes: tuple[float, float] = (1.0, 5.0),
               attacks: tuple[str, ...] = ()):
    """Register ``fn(out_dir: Path, *, quick: bool, seed: int, progress, runs) -> list[dict]`` as experiment ``name``."""
    def deco(fn):
        EXPERIMENTS[name] = Experiment(name, summary, fn, minutes, tuple(attacks))
        return fn
    return deco


def discover() -> None:
    """Import every module of the ``attacks`` package so that each registers what it implements."""
    import attacks
    for info in pkgutil.iter_modules(attacks.__path__):
        if info.name != "registry":
            importlib.import_module(f"attacks.{info.name}")


def row(attack: str, protocol: str, adversary: str, metrics: dict, baseline: dict, **extra) -> dict:
    """One scorecard row; ``extra`` (e.g. ``figure``, ``notes``) rides along."""
    return {"attack": attack, "protocol": protocol, "adversary": adversary,
            "metrics": dict(metrics), "baseline": dict(baseline), **extra}


def run_attack(name: str, run_dir: Path, **options) -> list[dict]:
    discover()
    if name not in ATTACKS:
        raise KeyError(f"unknown attack {name!r}; choose from {sorted(ATTACKS)}")
    return ATTACKS[name].run(Path(run_dir), **options)


def run_experiment(name: str, out_dir: Path, *, quick: bool = True, seed: int = 0,
                   progress: Callable[[str], None] | None = None, runs: dict[str, Path] | None = None) -> list[dict]:
    discover()
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; choose from {sorted(EXPERIMENTS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return EXPERIMENTS[name].run(out_dir, quick=quick, seed=seed, progress=progress or (lambda _msg: None),
                                 runs=runs or {})
