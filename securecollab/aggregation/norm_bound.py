"""Norm bound: an update whose model delta has an L2 norm above the bound is dropped ("reject") or scaled
down to the bound ("clip", u * min(1, B / ||u||), as in DP-FedAvg and most robust-FL baselines).

An update vector is the model delta followed by a counting 1 (securecollab.updates). It is accepted iff

* its counting entry is exactly 1 (a client may not count twice, or negatively),
* every delta coordinate lies in [-R, R), the *coordinate bound* (see below), and
* ||delta|| <= B, the norm bound (reject mode only; clip mode scales the delta instead and still counts it).

Inside MPC all three are computed on the shares and only their conjunction exists, as a secret bit per
client: nothing is revealed, neither the norms nor which clients passed (only the accepted count, through
the counting entry of the revealed sum). Clipping computes min(1, B / ||delta||) on the shares as well
(securecollab.aggregation.fixed_point: a range-reduced inverse square root, one value per client), so
nothing but the sum of the clipped deltas is revealed; its precision is the 16-bit fixed point's (the
clipped norm is B to within ~1e-5 B relative for updates near the bound, ~1% for one 1000 times above it).

Why the coordinate bound. The squared norm is computed exactly on the integer encodings,
sum_j (2^16 u_j)^2 = 2^32 ||u||^2 (no truncation, which would cost a round over all K*D squares and which
CrypTen's 3-party protocol gets wrong by 2^48 with probability ~|x|/2^64 per element). But the ring is
Z_2^64: a malicious client choosing its encodings can make the sum wrap around, e.g. any coordinate equal to
+-65536 squares to 2^64 = 0, so a vector of such coordinates passes a bare norm check with "norm" 0 and
wrecks the model (attacks/poisoning.py, ``wraparound``). Checking first that every coordinate lies in
[-R, R) with D * (2^16 R)^2 < 2^63 makes the sum exact, so the norm test is sound. R is a power of two,
2^k / 2^16, so the check is one arithmetic-to-binary conversion per coordinate (x + 2^k has no bit above k
set): about half the bytes of two comparisons (README, "Malicious clients"). It is the smallest power of
two above B, capped at 2^15.5 / sqrt(D) (rounded down to a power of two: at D = 10^6, R <= 32): a
coordinate bigger than the whole norm bound cannot occur in an honest update, so only updates no honest
client sends are refused. Its cost dominates every defence's (scripts/bench-defences: ~12 s a round at
K=10, D=10^5 on 2 cores, linear in K*D).

``range_check=False`` keeps the unsound check of earlier versions, only to show that the wrap-around
update passes it (tests, the poisoning sweep).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from securecollab.aggregation import AggregationRule, register_rule
from securecollab.aggregation.fixed_point import exponent_range, inv_sqrt, ratio, weighted_sum
from securecollab.plans import NORM_MODES
from securecollab.secagg.crypten_compat import load_crypten
from securecollab.secagg.sharing import FRAC_BITS, SCALE

# Squared norms live at scale 2^32 in a signed 64-bit ring: bound^2 * 2^32 < 2^63.
MAX_NORM_BOUND = 2.0 ** ((63 - 2 * FRAC_BITS) / 2) - 1.0
# Range checks convert this many elements at a time (CrypTen's binary circuits hold ~10 copies).
COMPARE_CHUNK = 1 << 20


def log_coordinate_bound(bound: float, dim: int) -> int:
    """k: delta encodings must lie in [-2^k, 2^k). The smallest power of two above the norm bound (no
    coordinate of an honest update reaches it), capped so that dim squares of at most 2^2k stay below 2^63."""
    cap = 0
    while dim * 4 ** (cap + 1) <= 2 ** 63 - 1:
        cap += 1
    return min(math.frexp(bound * SCALE)[1], cap)  # frexp: bound * SCALE < 2^e


def coordinate_bound(bound: float, dim: int) -> float:
    """R = 2^k / 2^16: the coordinate range [-R, R) as values."""
    return 2.0 ** log_coordinate_bound(bound, dim) / SCALE


def clear_well_formed(u: np.ndarray, bound: float) -> bool:
    """The counting entry is 1 and every delta encoding lies in [-2^k, 2^k) (in the clear)."""
    limit = 2.0 ** log_coordinate_bound(bound, u.size - 1)
    encodings = np.rint(np.asarray(u[:-1], dtype=np.float64) * SCALE)
    return bool(u[-1] == 1.0 and encodings.min(initial=0.0) >= -limit and encodings.max(initial=0.0) < limit)


def clear_accepts(u: np.ndarray, bound: float, range_check: bool = True) -> bool:
    """The reject-mode accept rule on one update vector (delta, then its counting entry), in the clear."""
    if u[-1] != 1.0 or (range_check and not clear_well_formed(u, bound)):
        return False
    return bool(np.linalg.norm(u[:-1]) <= bound)


def clear_clipped(u: np.ndarray, bound: float) -> np.ndarray | None:
    """Clip mode in the clear: the update with its delta scaled to norm <= bound, or None if ill formed."""
    if not clear_well_formed(u, bound):
        return None
    norm = np.linalg.norm(u[:-1])
    return np.append(u[:-1] * min(1.0, bound / norm if norm else 1.0), 1.0)


@register_rule("norm_bound")
class NormBound(AggregationRule):
    needs_dealer = True  # squares and comparisons multiply secrets: Beaver triples from the dealer

    def __init__(self, bound: float, range_check: bool = True, mode: str = "reject"):
        if not 0 < bound <= MAX_NORM_BOUND:
            raise ValueError(f"norm_bound must be in (0, {MAX_NORM_BOUND:.0f}], got {bound}")
        if mode not in NORM_MODES:
            raise ValueError(f"norm mode must be one of {NORM_MODES}, not {mode!r}")
        if mode == "clip" and not range_check:
            raise ValueError("clipping needs the range check (its norms would wrap around the ring without it)")
        self.bound, self.range_check, self.mode = bound, range_check, mode

    def clear(self, updates, weights):
        total = np.zeros_like(updates[0], dtype=np.float64)
        for w, u in zip(weights, updates):
            if self.mode == "clip":
                clipped = clear_clipped(u, self.bound)
                total += 0.0 if clipped is None else w * clipped
            elif clear_accepts(u, self.bound, self.range_check):
                total += w * u
        return total

    def in_mpc(self, x):
        if self.mode == "clip":
            return self.clipped_sum(x)
        accept = self.accept_bits(x)  # (K,) secret 0/1 at scale 1
        # One Beaver matmul (1,K) @ (K,D): the triple's product is only D long,
        # and a scale-1 bit times a scale-2^16 value needs no truncation.
        return accept.unsqueeze(0).matmul(x).squeeze(0)

    def clipped_sum(self, x):
        """sum_i ok_i * [min(1, B/||delta_i||) delta_i, 1] with ok_i the well-formedness bit, on the shares."""
        crypten = load_crypten()
        as_ints = _as_ints(x)
        delta = as_ints[:, :-1]
        dim = delta.size(1)
        radius = coordinate_bound(self.bound, dim)
        ok = well_formed(as_ints, log_coordinate_bound(self.bound, dim))  # (K,) scale 1
        relative = ratio(squared_norms(delta), self.bound ** 2)  # ||delta_i||^2 / B^2
        factor = inv_sqrt(relative, 0, exponent_range(dim * (radius / self.bound) ** 2))
        scaled = weighted_sum(factor * ok, x[:, :-1])
        count = ok.unsqueeze(0).matmul(x[:, -1:]).squeeze(0)
        return crypten.cat([scaled, count])

    def accept_bits(self, x):
        """Secret bits [update i is accepted] for the rows of the (K, D) MPCTensor x (last column: the count)."""
        as_ints = _as_ints(x)
        delta = as_ints[:, :-1]
        bound_sq = torch.tensor(math.floor(self.bound * self.bound * SCALE * SCALE), dtype=torch.long)
        within = squared_norms(delta).le(bound_sq)
        if not self.range_check:
            return within
        return within * well_formed(as_ints, log_coordinate_bound(self.bound, delta.size(1)))


def _as_ints(x):
    """The same shares read as plain integers (scale 1): products of them need no truncation."""
    return load_crypten().mpc.MPCTensor.from_shares(x.share, precision=0)


def squared_norms(delta):
    """2^32 ||delta_i||^2 per row, exact as long as no coordinate exceeds the coordinate bound."""
    from crypten.mpc.primitives import beaver

    squares = beaver.square(delta._tensor)  # the dealer's (r, r^2) pairs
    return load_crypten().mpc.MPCTensor.from_shares(squares.share.sum(1), precision=0)


def well_formed(as_ints, log_radius: int):
    """Secret bits per row: the counting entry is exactly 2^16 (a 1) and every other entry is in
    [-2^k, 2^k), k = log_radius.

    y = x + 2^k lies in [0, 2^(k+1)) iff bits k+1..63 of y are all zero, for any ring element (a wrapped
    value sets a high bit). So each entry costs one arithmetic-to-binary conversion (CrypTen's adder on XOR
    shares) and a local shift; the shifted words of a row are OR-ed together (a tree, one AND per level),
    with the words of count - 2^16, whose 64 bits must all be zero. A row is well formed iff its final word
    is zero: an OR over its 64 bits and one single-bit conversion back to arithmetic shares."""
    from crypten.mpc.primitives.beaver import B2A_single_bit
    from crypten.mpc.primitives.converters import _A2B

    n_rows, n_delta = as_ints.size(0), as_ints.size(1) - 1
    width = max(1, COMPARE_CHUNK // n_rows)  # columns per conversion
    word = _A2B((as_ints[:, -1:] - SCALE)._tensor)  # (K, 1): zero iff the count is exactly 1
    for start in range(0, n_delta, width):
        shifted = _A2B((as_ints[:, start:min(start + width, n_delta)] + (1 << log_radius))._tensor)
        word = word | _or_columns(shifted.rshift_(log_radius + 1))
    for shift in (32, 16, 8, 4, 2, 1):  # bit 0 becomes the OR of all 64 bits
        word = word | word.rshift(shift)
    bad = B2A_single_bit(word & 1)
    return 1 - load_crypten().mpc.MPCTensor.from_shares(bad.share.squeeze(1), precision=0)


def _or_columns(words):
    """(K, n) XOR-shared words -> (K, 1), the bitwise OR of each row (a tree of ceil(log2 n) AND rounds)."""
    while words.size(1) > 1:
        half = words.size(1) // 2
        merged = words[:, :half] | words[:, half:2 * half]
        if words.size(1) % 2:
            merged.share = torch.cat([merged.share, words.share[:, -1:]], dim=1)
        words = merged
    return words
