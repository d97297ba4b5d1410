"""An update that passes a bare in-MPC norm check by wrapping around the ring Z_2^64.

Every delta coordinate is +-65536: encoded at scale 2^16 that is 2^32, whose square is 2^64 = 0 in the
ring, so the exactly computed "squared norm" is 0 while the model is pushed 65536/K per weight. The sound
check (securecollab.aggregation.norm_bound: coordinates range-checked first) rejects it. (In a plain sum's
Z_2^32 the encoded 2^32 is 0, so there the update adds nothing; a norm check always runs in Z_2^64.)
"""

from __future__ import annotations

import numpy as np

from securecollab.poisoning import Behaviour, register_behaviour

WRAP = 65536.0  # 2^32 at 16 fractional bits


def wraparound_vector(delta: np.ndarray) -> np.ndarray:
    """The crafted delta, following the honest delta's signs (so it is not all one value)."""
    return np.where(np.asarray(delta) < 0, -WRAP, WRAP)


@register_behaviour("wraparound", "model_poisoning")
class Wraparound(Behaviour):
    def update(self, delta, rng):
        return wraparound_vector(delta)
