"""Protocol runs by name: each starts the parties as processes and returns accuracy and measured costs.

`run_protocol(name, plan, out_dir)` is what the pipeline, the experiments and the benchmarks call; each
run registers itself with `@register(name)` in `training.py` or `inference.py`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from securecollab.plans import FedAvgPlan

PROTOCOLS: dict[str, Callable[..., dict]] = {}


def register(name: str):
    def deco(fn):
        PROTOCOLS[name] = fn
        return fn
    return deco


def run_protocol(name: str, plan: FedAvgPlan, out_dir: Path, **kwargs) -> dict:
    discover()
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose from {sorted(PROTOCOLS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The training recipe is public (every client received it): attacks on the released model use it.
    (out_dir / "plan.json").write_text(plan.to_json())
    return PROTOCOLS[name](plan, out_dir, **kwargs)


def discover() -> None:
    """Import the modules whose runs register themselves."""
    for module in ("training", "inference", "mpc_inference"):
        importlib.import_module(f"securecollab.runs.{module}")
