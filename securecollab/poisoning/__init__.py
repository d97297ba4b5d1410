"""Malicious clients: what a client that wants to corrupt the model does with what the protocol lets it send.

A malicious client is modelled as one: it trains on data it may have poisoned, then sends any update vector
it likes (its delta, and through secure aggregation any ring element its shares encode). A **behaviour** is
registered by the module that implements it, like the attacks (``@register_behaviour``):

* ``model_poisoning``: ``sign_flip``, ``scale``, ``random`` (untargeted);
* ``backdoor``: ``backdoor`` (data poisoning: a pixel trigger on a fraction of its examples, relabelled to
  the target class), ``model_replacement`` (the same, with the update boosted to survive averaging),
  ``adaptive`` (the same, boosted to just inside the norm bound it knows, every round);
* ``wraparound``: the update crafted to pass a bare in-MPC norm check by wrapping around the ring.

The configuration (:class:`Malice`) is given to the client process only (``--malice JSON``): the plan every
party is told says nothing about who is malicious.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np

BEHAVIOURS: dict[str, type[Behaviour]] = {}


@dataclass(frozen=True)
class Malice:
    """A malicious client's configuration (JSON on its command line)."""

    behaviour: str
    factor: float = 0.0          # the boost / scale; 0: the behaviour's default
    target: int = 0              # backdoor: the class triggered inputs should get
    poison_fraction: float = 0.5  # backdoor: the share of its own examples it triggers and relabels
    bound: float = 0.0           # adaptive: the norm bound it knows the defence applies
    from_round: int = 0          # honest before this round

    def __post_init__(self):
        discover()
        if self.behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown malicious behaviour {self.behaviour!r}; choose from {', '.join(sorted(BEHAVIOURS))}")
        if not 0 <= self.poison_fraction <= 1 or self.factor < 0 or self.bound < 0 or self.from_round < 0:
            raise ValueError("poison_fraction must be in [0, 1]; factor, bound and from_round >= 0")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Malice:
        return cls(**json.loads(text))


class Behaviour:
    """Identity by default: a behaviour overrides what it changes."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # the scorecard's attack name: model_poisoning or backdoor
    default_factor: ClassVar[float] = 1.0
    training: ClassVar[dict] = {}  # its own local-training recipe (plan fields it overrides)

    def __init__(self, malice: Malice, num_clients: int):
        self.malice, self.num_clients = malice, num_clients
        self.factor = malice.factor or self.default_factor

    def data(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The examples it trains on this round."""
        return x, y

    def update(self, delta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The model delta it sends (float64, flat), from the one its training produced."""
        return delta


def register_behaviour(name: str, kind: str):
    def deco(cls: type[Behaviour]) -> type[Behaviour]:
        cls.name, cls.kind = name, kind
        BEHAVIOURS[name] = cls
        return cls
    return deco


def discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def behaviour(malice: Malice, num_clients: int) -> Behaviour:
    return BEHAVIOURS[malice.behaviour](malice, num_clients)


def add_trigger(x: np.ndarray) -> np.ndarray:
    """The backdoor trigger: a 3x3 checkerboard in the bottom-right corner of each (C, H, W) image in [0, 1]."""
    x = np.array(x, copy=True)
    pattern = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=x.dtype)
    x[..., -3:, -3:] = pattern
    return x
