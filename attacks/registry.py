"""Attacks by name, so the CLI and the experiments find them without a list to keep in sync.

An **attack** runs on a saved protocol run: ``run(run_dir, **options)`` reads
only what its adversary received (that party's transcript in
``run_dir/transcripts/`` plus the public plan) and returns scorecard rows. It
is registered by the module that implements it (adding one touches nothing
else). Experiments, which start the runs they attack, are registered the same
way in ``experiments/registry.py``.

A scorecard row uses DESIGN.md's vocabulary::

    {"attack": "gradient_inversion", "protocol": "secagg", "adversary": "coordinator",
     "metrics": {"psnr_db": 31.2, "n_clients": 4, ...}, "baseline": {"psnr_db": 11.0, ...}}
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from securecollab.vocabulary import regime_of


@dataclass(frozen=True)
class Attack:
    name: str
    adversary: str
    protocols: tuple[str, ...]
    summary: str
    run: Callable[..., list[dict]]


ATTACKS: dict[str, Attack] = {}


def attack(name: str, *, adversary: str, protocols: tuple[str, ...], summary: str):
    """Register ``fn(run_dir: Path, **options) -> list[dict]`` as attack ``name``."""
    def deco(fn):
        ATTACKS[name] = Attack(name, adversary, tuple(protocols), summary, fn)
        return fn
    return deco


def import_modules(package: str) -> None:
    """Import every module of ``package`` but its ``registry``, so that each registers what it implements."""
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if info.name != "registry":
            importlib.import_module(f"{package}.{info.name}")


def discover() -> None:
    """Import every module of the ``attacks`` package so that each registers what it implements."""
    import_modules("attacks")


def row(attack: str, protocol: str, adversary: str, metrics: dict, baseline: dict, **extra) -> dict:
    """One scorecard row; ``extra`` (e.g. ``figure``, ``notes``) rides along.

    A row that says how many local steps its observed updates took gets its ``regime`` from them here
    (:func:`securecollab.vocabulary.regime_of`); nobody sets a regime by hand."""
    metrics = dict(metrics)
    if "regime" in metrics:
        raise ValueError("a row's regime is derived from its local_steps, not given")
    if "local_steps" in metrics:
        metrics["regime"] = regime_of(metrics["local_steps"])
    return {"attack": attack, "protocol": protocol, "adversary": adversary,
            "metrics": metrics, "baseline": dict(baseline), **extra}


def run_attack(name: str, run_dir: Path, **options) -> list[dict]:
    discover()
    if name not in ATTACKS:
        raise KeyError(f"unknown attack {name!r}; choose from {sorted(ATTACKS)}")
    return ATTACKS[name].run(Path(run_dir), **options)
