"""Distributed DP noise: Gaussian noise N(0, sigma^2) on every coordinate of another rule's aggregate.

Inside MPC the noise is the sum of n independent N(0, sigma^2 / n) parts, one
secret-shared by each compute party, so no party knows the total noise. In
the clear the aggregator draws it itself (and so knows it).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from securecollab.aggregation import AggregationRule, register_rule
from securecollab.secagg.crypten_compat import load_crypten


@register_rule("dp_noise")
class DistributedNoise(AggregationRule):
    def __init__(self, inner: AggregationRule, sigma: float):
        if not 0 <= sigma < math.inf:  # infinite noise would encode as CrypTen's most negative integer
            raise ValueError(f"dp_sigma must be finite and >= 0, got {sigma}")
        self.inner, self.sigma = inner, sigma

    @property
    def needs_dealer(self) -> bool:
        return self.inner.needs_dealer  # the noise itself is linear

    @property
    def real_weights(self) -> bool:
        return self.inner.real_weights

    def clear(self, updates, weights):
        total = self.inner.clear(updates, weights)
        return total + np.random.default_rng().standard_normal(total.shape) * self.sigma

    def in_mpc(self, x):
        crypten = load_crypten()
        MPCTensor = crypten.mpc.MPCTensor
        total = self.inner.in_mpc(x)
        comm = crypten.communicator.get()
        n_parties, rank = comm.get_world_size(), comm.get_rank()
        size = x.share.shape[1]
        # Fresh OS entropy: the noise must be unpredictable to the other parties.
        own = np.random.default_rng().standard_normal(size) * (self.sigma / math.sqrt(n_parties))
        placeholder = torch.zeros(size, dtype=torch.float64)  # only its size matters off-source
        for src in range(n_parties):
            total = total + MPCTensor(torch.from_numpy(own) if src == rank else placeholder, src=src)
        return total
