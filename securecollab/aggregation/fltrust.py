"""FLTrust (Cao et al., NDSS 2021): trust scores from cosine similarity to the server's own update.

The coordinator holds a small clean root data set and computes, from the same global model with the same
local recipe, its own update g0 (securecollab.protocols.fedavg.root_delta). Client i gets the trust score

    TS_i = relu(cos(delta_i, g0)),

its delta is rescaled to the norm of g0, and the aggregate is sum_i TS_i * (||g0|| / ||delta_i||) delta_i
divided by sum_i TS_i. A client whose update points away from the server's gets no weight, and none can
gain weight by boosting its norm (model replacement): every update is normalised.

Here the rule returns [sum_i w_i delta_i, sum_i TS_i] with w_i = TS_i ||g0|| / ||delta_i||, so the counting
entry of the result is the total trust and securecollab.updates.apply_aggregate divides by it.

Inside MPC g0 is public to the compute parties (the coordinator sends it with the aggregation request: it
reveals the coordinator's root data, not any client's), so <delta_i, g0> is local; ||delta_i||^2 is exact on
the integer encodings after the range check (securecollab.aggregation.norm_bound), relu is one comparison per
client, and ||g0|| / ||delta_i|| is a range-reduced inverse square root (securecollab.aggregation.fixed_point).
What is revealed: the weighted sum and the total trust sum_i TS_i (one number per round), nothing per client.

Differences from the paper, both needed to bound fixed-point error: for an update shorter than ||g0|| / 8,
1/||delta_i|| is taken as 8/||g0|| (so it is amplified at most 8 times instead of without limit, and its trust
is damped by the same factor, 8 ||delta_i|| / ||g0||), and an update
that is not well formed (a coordinate above the coordinate bound, a counting entry other than 1) gets no
weight at all.
"""

from __future__ import annotations

import numpy as np
import torch

from securecollab.aggregation import AggregationRule, register_rule
from securecollab.aggregation.fixed_point import exponent_range, inv_sqrt, nonnegative, ratio, to_frac_bits, weighted_sum
from securecollab.aggregation.norm_bound import (MAX_NORM_BOUND, _as_ints, clear_well_formed, coordinate_bound,
                                                 log_coordinate_bound, squared_norms, well_formed)
from securecollab.secagg.crypten_compat import load_crypten
from securecollab.secagg.sharing import SCALE

SHORTEST = -3  # updates shorter than ||g0|| * 2^SHORTEST are normalised as if they were that long
# ||g0|| must keep <delta, g0> * 2^32 inside the ring (||delta|| <= 2^15.5 after the range check) and
# ||g0||^2 * 2^16 well above one unit.
REFERENCE_NORM = (2.0 ** -3, 2.0 ** 15)


def check_reference(reference: np.ndarray, dim: int) -> np.ndarray:
    """The root update as the rule needs it: finite, `dim` long, with a norm the fixed point can carry."""
    g0 = np.asarray(reference, dtype=np.float64).reshape(-1)
    if g0.size != dim:
        raise ValueError(f"the root update has {g0.size} coordinates, the model {dim}")
    if not np.isfinite(g0).all():
        raise ValueError("the root update is not finite")
    norm = float(np.linalg.norm(g0))
    if not REFERENCE_NORM[0] <= norm <= REFERENCE_NORM[1]:
        raise ValueError(f"the root update's norm {norm:.3g} is outside [{REFERENCE_NORM[0]:g}, "
                         f"{REFERENCE_NORM[1]:g}]: the root data set or its learning rate does not fit FLTrust here")
    return g0


@register_rule("fltrust")
class FLTrust(AggregationRule):
    needs_dealer = True
    real_weights = True  # the counting entry is the total trust, not a number of clients

    def __init__(self, reference):
        self.reference = np.asarray(reference, dtype=np.float64).reshape(-1)

    def scores(self, deltas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(TS_i, w_i) for the rows of `deltas`, in the clear."""
        g0 = check_reference(self.reference, deltas.shape[1])
        g0_norm = np.linalg.norm(g0)
        norms = np.maximum(np.linalg.norm(deltas, axis=1), g0_norm * 2.0 ** SHORTEST)
        trust = np.maximum(deltas @ g0, 0.0) / (norms * g0_norm)
        return trust, trust * g0_norm / norms

    def clear(self, updates, weights):
        updates = np.asarray(updates, dtype=np.float64)
        deltas = updates[:, :-1]
        ok = np.array([clear_well_formed(u, MAX_NORM_BOUND) for u in updates])
        trust, w = self.scores(np.where(ok[:, None], deltas, 0.0))
        trust, w = trust * ok, w * ok
        return np.append(w @ deltas, trust.sum())

    def in_mpc(self, x):
        crypten = load_crypten()
        as_ints = _as_ints(x)
        delta = as_ints[:, :-1]
        dim = delta.size(1)
        g0 = check_reference(self.reference, dim)
        g0_sq = float(g0 @ g0)
        radius = coordinate_bound(MAX_NORM_BOUND, dim)
        ok = well_formed(as_ints, log_coordinate_bound(MAX_NORM_BOUND, dim))  # (K,) scale 1
        # <delta_i, g0> on the integer encodings: a public matrix-vector product, local to each party.
        g0_ints = torch.from_numpy(np.round(g0 * SCALE).astype(np.int64))
        dots = delta.matmul(g0_ints.unsqueeze(1)).squeeze(1)  # 2^32 <delta_i, g0>
        along = ratio(dots, g0_sq)  # <delta_i, g0> / ||g0||^2
        relative = ratio(squared_norms(delta), g0_sq)  # ||delta_i||^2 / ||g0||^2
        inv = inv_sqrt(relative, SHORTEST, exponent_range(dim * radius ** 2 / g0_sq))  # ||g0|| / ||delta_i||
        positive = nonnegative(along) * ok  # scale 1
        trust = along * positive * inv  # relu(cos)
        weights = trust * inv
        return crypten.cat([weighted_sum(weights, x[:, :-1]), to_frac_bits(trust.sum(0, keepdim=True))])
