"""Experiments by name: each starts the protocol runs it needs (real services over gRPC) and attacks them.

An **experiment** is ``run(out_dir, *, quick, seed, progress, runs=None)``: it
returns scorecard rows (made with ``attacks.registry.row``) and writes its
figures under ``out_dir``. ``runs`` maps a protocol name to the directory of
a run that already exists (the demo passes its own runs); an experiment uses
them where they fit and otherwise starts the runs it needs. One module of this
package per experiment, registered with ``@experiment``; the pipeline and the
CLI find it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from attacks.registry import import_modules


@dataclass(frozen=True)
class Experiment:
    name: str
    summary: str
    run: Callable[..., list[dict]]
    # rough minutes on 2 cores, quick and full (shown in --help and progress)
    minutes: tuple[float, float] = (1.0, 5.0)
    attacks: tuple[str, ...] = field(default=())


EXPERIMENTS: dict[str, Experiment] = {}


def experiment(name: str, *, summary: str, minutes: tuple[float, float] = (1.0, 5.0),
               attacks: tuple[str, ...] = ()):
    """Register ``fn(out_dir: Path, *, quick: bool, seed: int, progress, runs) -> list[dict]`` as experiment ``name``."""
    def deco(fn):
        EXPERIMENTS[name] = Experiment(name, summary, fn, minutes, tuple(attacks))
        return fn
    return deco


def discover() -> None:
    """Import every module of the ``experiments`` package so that each registers itself."""
    import_modules("experiments")


def run_experiment(name: str, out_dir: Path, *, quick: bool = True, seed: int = 0,
                   progress: Callable[[str], None] | None = None, runs: dict[str, Path] | None = None) -> list[dict]:
    discover()
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; choose from {sorted(EXPERIMENTS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return EXPERIMENTS[name].run(out_dir, quick=quick, seed=seed, progress=progress or (lambda _msg: None),
                                 runs=runs or {})
