"""Aggregation rules: how one round's client updates become their aggregate (in the spirit of Flower's Strategy).

An update is a flat float64 vector: a client's model delta followed by a 1
that counts it (`securecollab.updates.update_vector`). A rule returns the
combination sum_i c_i * w_i * u_i, where w_i is the weight the protocol gives
client i (its example count in plain FedAvg, 1 in secure aggregation) and
c_i the rule's own coefficient (1 for the mean, 0/1 for a norm bound, ...).
Because the counting 1 is combined too, the last entry of the result is the
total weight (a count of clients, or with `real_weights` a total such as
FLTrust's trust), and `securecollab.updates.apply_aggregate` turns the result
into the next global model.

A rule says how to compute this twice:

* `clear(updates, weights)`: by a party that sees every update (the plain
  FedAvg aggregator; for a robust rule, the privacy-violating baseline);
* `in_mpc(x)`: by the compute parties on an MPCTensor of secret-shared
  updates (K, D), returning an MPCTensor of which only the opened result is
  ever revealed. `needs_dealer` says whether it multiplies secrets (Beaver
  triples from the dealer).

A new rule is one module in this package that subclasses `AggregationRule`
and registers itself with `@register_rule("name")`.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

RULES: dict[str, type[AggregationRule]] = {}


class AggregationRule(ABC):
    name: ClassVar[str] = ""
    needs_dealer: ClassVar[bool] = False
    real_weights: ClassVar[bool] = False  # the counting entry is a real total weight, not a whole count
    # in_mpc is the plain sum of the rows: each party adds its shares as it reads them, with no (K, D) matrix
    # and no MPC (at K = 1000 stacking the shares took seconds and gigabytes)
    local_sum: ClassVar[bool] = False

    @abstractmethod
    def clear(self, updates: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
        """sum_i c_i * w_i * updates[i], computed in the clear."""

    @abstractmethod
    def in_mpc(self, x):
        """The same combination of the rows of the secret-shared (K, D) MPCTensor `x` (weights 1)."""


def register_rule(name: str):
    def deco(cls: type[AggregationRule]) -> type[AggregationRule]:
        cls.name = name
        RULES[name] = cls
        return cls
    return deco


def discover() -> None:
    """Import every module of this package so that each rule registers itself."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def rule(name: str, **options) -> AggregationRule:
    """The registered rule `name`, configured with `options`."""
    discover()
    if name not in RULES:
        raise ValueError(f"unknown aggregation rule {name!r}; choose from {', '.join(sorted(RULES))}")
    return RULES[name](**options)


def secure_rule(norm_bound: float | None = None, dp_sigma: float | None = None, *, norm_mode: str = "reject",
                robust: str | None = None, reference=None, range_check: bool = True) -> AggregationRule:
    """The rule secure aggregation runs inside MPC: the sum, norm-bounded (rejected or clipped) or a robust
    rule (FLTrust against the coordinator's `reference` update), optionally noised. ``range_check=False``
    only to demonstrate the unsound bare norm check (securecollab.aggregation.norm_bound)."""
    if robust:
        if norm_bound is not None:
            raise ValueError(f"{robust} normalises every update itself: it does not combine with a norm bound")
        if robust != "fltrust":
            raise ValueError(f"unknown robust rule {robust!r}; choose fltrust")
        if reference is None:
            raise ValueError("fltrust needs the coordinator's root update")
        base = rule("fltrust", reference=reference)
    elif norm_bound is not None:
        base = rule("norm_bound", bound=norm_bound, range_check=range_check, mode=norm_mode)
    else:
        base = rule("mean")
    return rule("dp_noise", inner=base, sigma=dp_sigma) if dp_sigma else base
