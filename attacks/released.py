"""The model a training run released, as the adversary who is handed it loads it (a *model-user*).

A training protocol ends by releasing its final weights: one state dict for
centralized training, FedAvg and secure aggregation, or split learning's
parts. The adversary knows the public plan (architecture, data set) and the
files; it reads nothing else of the run.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from securecollab.models import MODELS, load_arrays

# The protocols that release a trained model (the targets of the membership attacks).
TRAINING_PROTOCOLS = ("centralized", "fedavg", "secagg", "split")


def released_arrays(run_dir: Path, protocol: str) -> list[dict[str, np.ndarray]]:
    """The weights a training protocol released: one state dict, or split learning's parts.

    Split learning in hand-off mode releases the server's layers past the cut
    (``split_server_part.npz``) and, with the last client in turn order, the
    bottom (and the head, U-shaped) in ``split_client-<i>_part.npz``: returned
    as [bottom, server part, head], each numbered from its own first layer.
    """
    run_dir = Path(run_dir)
    if protocol in ("centralized", "fedavg", "secagg"):
        return [_npz(run_dir / f"{protocol}_model.npz")]
    if protocol != "split":
        raise ValueError(f"no released model for protocol {protocol!r}")
    clients = sorted(run_dir.glob("split_client-*_part.npz"),
                     key=lambda p: int(p.name.removeprefix("split_client-").removesuffix("_part.npz")))
    if not clients:
        raise FileNotFoundError(f"{run_dir}: no split_client-<i>_part.npz")
    client = _npz(clients[-1])
    return [{k.removeprefix("bottom."): v for k, v in client.items() if k.startswith("bottom.")},
            _npz(run_dir / "split_server_part.npz"),
            {k.removeprefix("head."): v for k, v in client.items() if k.startswith("head.")}]


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def load_released(run_dir: Path, protocol: str, plan):
    """(model, plan): the released model of ``protocol``'s run in ``run_dir``, built from ``plan`` (a FedAvgPlan).

    The architecture comes from the plan; if the weights do not fit it, the
    other registered architectures are tried (the adversary sees the shapes).
    """
    parts = released_arrays(run_dir, protocol)
    ds = plan.load_data()
    errors = []
    for name in (plan.model, *[m for m in MODELS if m != plan.model]):
        try:
            model = replace(plan, model=name).build_model(ds)
            load_arrays(model, stack_parts(model, parts))
            return model.eval(), replace(plan, model=name)
        except ValueError as e:
            errors.append(f"{name}: {e}")
    raise ValueError(f"{run_dir}: the released weights fit no known model ({'; '.join(errors)})")


def stack_parts(model, parts: list[dict[str, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
    """Consecutive parts' weights renumbered into ``model``'s layer numbering, at the cuts where they fit.

    The cut is not stored with the weights: it is the one at which every
    part's names and shapes match the model (one part: no renumbering).
    """
    parts = [p for p in parts if p]
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    cuts = sorted(set(model.cut_points.values()))

    def placed(part: dict[str, np.ndarray], start: int) -> list[tuple[str, np.ndarray]]:
        out = []
        for k, v in part.items():
            layer, rest = k.split(".", 1)
            out.append((f"{int(layer) + start}.{rest}", v))
        return out

    def search(i: int, start: int) -> list[tuple[str, np.ndarray]] | None:
        if i == len(parts):
            return []
        here = placed(parts[i], start)
        if not all(state.get(k) == v.shape for k, v in here):
            return None
        for nxt in ([c for c in cuts if c > start] if i + 1 < len(parts) else [None]):
            rest = search(i + 1, nxt) if nxt is not None else []
            if rest is not None:
                return here + rest
        return None

    found = search(0, 0)
    if found is None or len(found) != len(state):
        raise ValueError(f"the released parts fit no cut of {type(model).__name__}")
    return found


def detect_protocol(run_dir: Path) -> str:
    """Which training protocol released a model in ``run_dir`` (by the file it wrote)."""
    run_dir = Path(run_dir)
    for protocol in ("centralized", "fedavg", "secagg"):
        if (run_dir / f"{protocol}_model.npz").exists():
            return protocol
    if (run_dir / "split_server_part.npz").exists():
        return "split"
    raise FileNotFoundError(f"{run_dir}: no released model of {', '.join(TRAINING_PROTOCOLS)}")
