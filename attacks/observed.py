"""What the adversary observed, turned into the quantities attacks work on.

The plain FedAvg aggregator receives each client's new weights (transcript
records of kind ``Kind.UPDATE``); it knows the global weights it sent because it
computed them. Their difference is the client's update, and for one plain SGD
step it is ``-lr * gradient``: the gradient of the client's loss on its data.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from attacks.knowledge import LocalTraining
from securecollab.transcript import Kind, Transcript

NamedArrays = Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]]


def as_dict(named: NamedArrays) -> dict[str, np.ndarray]:
    """(name, array) pairs or a mapping, as a fresh dict of float32 arrays."""
    items = named.items() if isinstance(named, Mapping) else named
    return {name: np.asarray(array, dtype=np.float32) for name, array in items}


def parameter_delta(global_params: NamedArrays, new_params: NamedArrays) -> dict[str, np.ndarray]:
    """The client's update: new weights minus the global weights it started from (float64 to keep small steps)."""
    g, n = as_dict(global_params), as_dict(new_params)
    if g.keys() != n.keys():
        raise ValueError(f"parameter names differ: {sorted(g.keys() ^ n.keys())}")
    return {name: n[name].astype(np.float64) - g[name].astype(np.float64) for name in g}


def gradient_from_update(global_params: NamedArrays, new_params: NamedArrays, training: LocalTraining,
                         num_examples: int) -> dict[str, np.ndarray]:
    """The gradient the update implies, ``(global - new) / displacement_scale``.

    Exact for one SGD step; after several local steps it is the average of
    the gradients along the way (scaled for momentum), an approximation.
    """
    scale = training.displacement_scale(num_examples)
    return {name: -d / scale for name, d in parameter_delta(global_params, new_params).items()}


def client_updates(transcript: Transcript, round_: int) -> dict[str, tuple[int, dict[str, np.ndarray]]]:
    """Per sender, ``(num_examples, new weights)`` it submitted in round ``round_``, as recorded."""
    out = {}
    for record in transcript.of_kind(Kind.UPDATE):
        if record.round == round_:
            out[record.sender] = (int(record.meta.get("num_examples", 1)), as_dict(record.tensors))
    return out


def global_params_at(initial: NamedArrays, transcript: Transcript, round_: int) -> dict[str, np.ndarray]:
    """The global weights the aggregator sent at the start of ``round_``, replayed from its own transcript.

    Same arithmetic as the aggregator (example-weighted mean in float64, then
    float32), so when every round's updates were recorded the replay matches
    up to the order of the float64 sum (arrival order vs recording order).
    """
    params = as_dict(initial)
    for r in range(round_):
        updates = client_updates(transcript, r)
        if not updates:
            raise ValueError(f"transcript has no updates for round {r}")
        weights = np.array([n for n, _ in updates.values()], dtype=np.float64)
        weights /= weights.sum()
        params = {name: sum(w * u[name].astype(np.float64) for w, (_, u) in zip(weights, updates.values()))
                  .astype(np.float32) for name in params}
    return params
