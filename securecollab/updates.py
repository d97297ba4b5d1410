"""Update vectors: what a secure-aggregation client secret-shares, and how the revealed sum moves the model."""

from __future__ import annotations

import numpy as np

from securecollab.errors import TooFewClients


def update_vector(params, global_params) -> np.ndarray:
    """What a client secret-shares: its model delta, then a 1 that counts it.

    Deltas are averaged uniformly over the included clients (the count is
    itself shared, so the coordinator learns only how many were included).
    Weighting by example counts would scale a vector by ~n and push honest
    norms past what the in-MPC norm check can handle (securecollab.aggregation.norm_bound).
    """
    delta = [(p.astype(np.float64) - g).ravel() for (_, p), (_, g) in zip(params, global_params)]
    return np.concatenate([*delta, [1.0]])


def ready_update(index: int, params: int, seed: int) -> np.ndarray:
    """Benchmarks: party `index`'s ready-made update of `params` floats (clients index < K; the coordinator's
    FLTrust root update is index K), the same wherever it is computed."""
    return np.random.default_rng([seed, index]).normal(0, 0.05, params).astype(np.float32)


def apply_aggregate(global_params, aggregate: np.ndarray, real_weights: bool = False):
    """New global model from the revealed sum of update vectors: θ + Σ Δᵢ / count. The count is a whole
    number of clients (rounded: fixed-point and DP noise), or with `real_weights` a total weight such as
    FLTrust's total trust."""
    count = float(aggregate[-1]) if real_weights else round(float(aggregate[-1]))
    if count < (1e-3 if real_weights else 1):  # every update failed the norm bound, or none was trusted
        raise TooFewClients(f"the aggregate counts {aggregate[-1]:.3f} clients: no update was accepted")
    out, offset = [], 0
    for name, g in global_params:
        step = aggregate[offset:offset + g.size].reshape(g.shape) / count
        out.append((name, (g + step).astype(np.float32)))
        offset += g.size
    return out
