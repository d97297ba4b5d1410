"""Fixed-point arithmetic on secret shares that CrypTen's own approximations get wrong for update norms.

Clipping and trust-weighted rules need 1/||u|| for norms that range over many orders of magnitude (an honest
delta near the bound, a boosted one 1000 times above it). CrypTen's ``inv_sqrt`` starts its Newton iterations
from exp(-x/2), which converges only on a narrow range and returns garbage (even negative values) for large
inputs. Here the input is range-reduced first, exactly: compare it with the powers 4^j (one batched comparison),
which selects the bucket [4^j, 4^(j+1)) it lies in as secret one-hot bits; the bucket's value s / 4^j lies in
[1, 4), where four Newton steps from a linear start reach the fixed-point floor (2^-16); the result is scaled
back by 2^-j, a power of two, which the encoding represents exactly. Everything is elementwise on one
value per client, so its cost is negligible beside the per-coordinate work of the rules.

The per-client coefficients are computed at 24 fractional bits (WORK_BITS), not CrypTen's 16: a coefficient
multiplies a whole update, so its absolute error scales with the update's norm (a boosted update 250 times
the reference norm gets weight ~1/250, which 16 bits carry to only 0.4%).
"""

from __future__ import annotations

import math

import torch

from securecollab.secagg.crypten_compat import load_crypten
from securecollab.secagg.sharing import FRAC_BITS, SCALE

NEWTON_STEPS = 4  # from the chord on [1, 4]: relative error 0.19, 0.056, 0.0047, 3e-5, 2e-9
WORK_BITS = 24


def reinterpret(x, precision: int):
    """The same shares read at another fixed-point precision (no communication)."""
    return load_crypten().mpc.MPCTensor.from_shares(x.share, precision=precision)


def ratio(exact_ints, denominator: float):
    """exact_ints / (2^32 * denominator) as a WORK_BITS MPCTensor, for exact_ints = 2^32 * value (the exact
    products of two 2^16 encodings, e.g. squared norms): one truncation by the public integer
    round(2^16 * denominator), which must be large enough to carry the denominator's precision."""
    divisor = round(SCALE * denominator)
    if divisor < 64:
        raise ValueError(f"denominator {denominator:g} is below the fixed-point resolution this rule needs")
    return at_work_precision(reinterpret(exact_ints.div(divisor), FRAC_BITS))


def at_work_precision(x):
    """A precision-16 MPCTensor re-encoded at WORK_BITS (exact: a local multiplication of the shares)."""
    out = reinterpret(x, WORK_BITS)
    out.share = x.share * 2 ** (WORK_BITS - FRAC_BITS)
    return out


def weighted_sum(coefficients, rows):
    """sum_i c_i rows_i at precision 16, for WORK_BITS coefficients (K,) and precision-16 rows (K, D): one
    Beaver matrix product (its triple is D long) and one truncation per coordinate."""
    as_ints = reinterpret(coefficients, 0)  # 2^24 c_i as integers: the product needs no truncation of its own
    return as_ints.unsqueeze(0).matmul(rows).squeeze(0).div(2 ** WORK_BITS)


def to_frac_bits(x):
    """A WORK_BITS MPCTensor at precision 16 (one truncation)."""
    return reinterpret(reinterpret(x, 0).div(2 ** (WORK_BITS - FRAC_BITS)), FRAC_BITS)


def exponent_range(largest: float) -> int:
    """The smallest h with 4^h > largest: the number of buckets above 1 that inv_sqrt must tell apart."""
    return max(1, math.ceil(math.log(max(largest, 1.0), 4)) + 1)


def inv_sqrt(s, lowest: int, highest: int):
    """1 / sqrt(max(s, 4^lowest)) for an MPCTensor s of shape (K,) with s < 4^highest, at s's precision.

    With lowest = 0 this is min(1, 1/sqrt(s)): the clipping factor of s = ||u||^2 / B^2."""
    crypten = load_crypten()
    exps = list(range(lowest, highest))
    k = s.size(0)
    thresholds = torch.tensor([4.0 ** j for j in exps], dtype=torch.float64)
    tiled = s.unsqueeze(1).expand(k, len(exps))
    at_least = nonnegative(tiled - thresholds)  # (K, L) secret bits [s >= 4^j], scale 1: monotone in j
    # onehot_j = at_least_j - at_least_(j+1): bucket j holds s in [4^j, 4^(j+1)) (a public linear map)
    differences = torch.eye(len(exps), dtype=torch.long) - torch.diag(torch.ones(len(exps) - 1, dtype=torch.long), -1)
    onehot = at_least.matmul(differences)
    precision = round(math.log2(s.encoder.scale))
    below = as_fixed(1 - at_least[:, 0], precision)  # s < 4^lowest: clamped to 4^lowest
    # s / 4^j per bucket, exact up to the truncation's last bit: multiply by 4^-j, or divide by 4^j.
    up = torch.tensor([4 ** max(-j, 0) for j in exps], dtype=torch.long)
    down = torch.tensor([4 ** max(j, 0) for j in exps], dtype=torch.long)
    scaled = tiled.clone()
    scaled.share = scaled.share * up
    scaled = scaled.div(down)
    # (CrypTen's add re-encodes a lower-precision operand in place: keep every summand at s's precision.)
    reduced = (onehot * scaled).sum(1) + below  # in [1, 4)
    y = 1 - (reduced - 1).div(6)  # the chord of 1/sqrt on [1, 4]
    for _ in range(NEWTON_STEPS):
        y = y * (3 - reduced * y.square()).div(2)
    back = torch.tensor([2.0 ** -j for j in exps], dtype=torch.float64)  # powers of two: exact
    return y * (as_fixed(onehot, precision).matmul(back) + below * 2.0 ** -lowest)


def nonnegative(x):
    """Secret bits [x >= 0] (scale 1). The sign is read off the integer view: CrypTen's own comparisons
    re-encode at its default 16 bits on the way and misread a tensor of another precision."""
    return 1 - reinterpret(x, 0)._ltz()


def as_fixed(bits, precision: int):
    """Secret 0/1 bits (scale 1, as CrypTen's comparisons give them) as fixed-point values."""
    out = reinterpret(bits, precision)
    out.share = bits.share * 2 ** precision
    return out
