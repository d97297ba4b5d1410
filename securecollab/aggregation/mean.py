"""The mean: plain FedAvg's rule (weighted by examples) and secure aggregation's plain sum (uniform)."""

from __future__ import annotations

import numpy as np

from securecollab.aggregation import AggregationRule, register_rule


@register_rule("mean")
class Mean(AggregationRule):
    local_sum = True

    def clear(self, updates, weights):
        total = np.zeros_like(updates[0], dtype=np.float64)
        for w, u in zip(weights, updates):
            total += w * u
        return total

    def in_mpc(self, x):
        return x.sum(0)  # sums of shares are local: no communication, no dealer
