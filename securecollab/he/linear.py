"""Encrypted matrix-vector products for one input vector packed in one CKKS ciphertext.

Layout: a vector of length ``n`` is zero-padded to the power of two
``n' >= n`` and repeated across every slot, so rotating the whole ciphertext
rotates each copy cyclically. With ``W`` padded to ``m' x n'`` and
``k = min(m', n')`` generalized diagonals ``d_i[j] = W[j mod m', (j+i) mod n']``
(length ``L = max(m', n')``), ``sum_i d_i * rot(x, i)`` holds row ``j mod m'``'s
partial sums; when ``m' < n'`` a few rotate-and-add folds finish the rows. The
result is again repeated with period ``m'``, ready for the next layer.

Baby-step/giant-step: ``i = q*g + r`` with ``g ~ sqrt(k)``, so only ``g - 1``
rotations of ``x`` plus ``k/g - 1`` rotations of partial sums are needed
instead of ``k - 1``. Every rotation used is by a power of two (baby steps
chain earlier ones, giant steps use Horner's rule), so a handful of Galois
keys serves every layer. Diagonals are encoded once at the level and scale
they are used at; their scale equals the prime the rescale drops, so the
ciphertext's scale comes out unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tenseal import sealapi

from securecollab.he.seal import SealKit


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class DiagonalPlan:
    """Sizes of the diagonal method for an ``out_features x in_features`` matrix."""

    out_features: int
    in_features: int

    @property
    def in_period(self) -> int:
        return next_pow2(self.in_features)

    @property
    def out_period(self) -> int:
        return next_pow2(self.out_features)

    @property
    def length(self) -> int:
        return max(self.in_period, self.out_period)

    @property
    def n_diagonals(self) -> int:
        return min(self.in_period, self.out_period)

    @property
    def baby(self) -> int:
        k = self.n_diagonals
        return 1 << ((k.bit_length() - 1 + 1) // 2)  # 2**ceil(log2(k)/2)

    @property
    def giant(self) -> int:
        return self.n_diagonals // self.baby

    def fold_steps(self) -> list[int]:
        """Rotate-and-add steps summing the n'/m' partial blocks of each row."""
        steps, s = [], self.in_period // 2
        while s >= self.out_period:
            steps.append(s)
            s //= 2
        return steps

    def galois_steps(self) -> list[int]:
        steps = set()
        s = 1
        while s < self.baby:
            steps.add(s)
            s *= 2
        if self.giant > 1:
            steps.add(self.baby)
        steps.update(self.fold_steps())
        return sorted(steps)


def replicate(values: np.ndarray, period: int, slot_count: int) -> np.ndarray:
    """values zero-padded to ``period`` and repeated over all slots."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if len(values) > period or slot_count % period:
        raise ValueError(f"cannot repeat {len(values)} values with period {period} in {slot_count} slots")
    padded = np.zeros(period)
    padded[:len(values)] = values
    return np.tile(padded, slot_count // period)


def generalized_diagonals(weight: np.ndarray, plan: DiagonalPlan) -> np.ndarray:
    """(k, L) array: row i is d_i[j] = W'[j mod m', (j + i) mod n']."""
    padded = np.zeros((plan.out_period, plan.in_period))
    padded[:plan.out_features, :plan.in_features] = weight
    j = np.arange(plan.length)
    i = np.arange(plan.n_diagonals)[:, None]
    return padded[j % plan.out_period, (j + i) % plan.in_period]


def rotations_pow2(kit: SealKit, ct: sealapi.Ciphertext, count: int,
                   unit: int = 1) -> list[sealapi.Ciphertext]:
    """[rot(ct, 0), rot(ct, unit), ..., rot(ct, (count-1)*unit)], each made by one
    rotation by ``unit`` times a power of two."""
    out = [ct]
    for r in range(1, count):
        top = 1 << (r.bit_length() - 1)
        rotated = sealapi.Ciphertext()
        kit.evaluator.rotate_vector(out[r - top], top * unit, kit.galois_keys, rotated)
        out.append(rotated)
    return out


class EncryptedLinear:
    """``y = W x + b`` on a ciphertext at rescale level ``level`` and scale ``in_scale``.

    The output is one level lower, at the same scale, repeated with period
    ``plan.out_period`` (the bias too: a following layer reads every slot).
    """

    def __init__(self, kit: SealKit, weight: np.ndarray, bias: np.ndarray | None,
                 *, level: int, in_scale: float):
        weight = np.asarray(weight, dtype=np.float64)
        self.kit = kit
        self.plan = DiagonalPlan(*weight.shape)
        slots = kit.slot_count
        if slots % self.plan.length:
            raise ValueError(f"a {weight.shape} layer needs {self.plan.length} slots, have {slots}")
        parms, primes = kit.level_parms(), kit.level_primes()
        if level + 1 >= len(parms):
            raise ValueError(f"no rescale left at level {level}: build the context with more depth")
        reps = slots // self.plan.length
        diagonals = generalized_diagonals(weight, self.plan)
        g = self.plan.baby
        # plains[q][r] multiplies rot(x, r) in giant block q; None marks a zero diagonal
        # (SEAL refuses products that would be transparent).
        self.plains: list[list[sealapi.Plaintext | None]] = []
        for q in range(self.plan.giant):
            row = []
            for r in range(g):
                d = diagonals[q * g + r]
                if not d.any():
                    row.append(None)
                    continue
                # Pre-rotate by -q*g so one rotation of the block sum lines it up.
                row.append(kit.encode(np.roll(np.tile(d, reps), q * g), parms[level], primes[level]))
            self.plains.append(row)
        self.bias = None
        if bias is not None and np.any(bias):
            self.bias = kit.encode(replicate(bias, self.plan.out_period, slots), parms[level + 1], in_scale)

    @property
    def galois_steps(self) -> list[int]:
        return self.plan.galois_steps()

    def __call__(self, ct: sealapi.Ciphertext) -> sealapi.Ciphertext:
        kit, ev, keys = self.kit, self.kit.evaluator, self.kit.galois_keys
        used = [r for r in range(self.plan.baby) if any(row[r] is not None for row in self.plains)]
        rotated = rotations_pow2(kit, ct, max(used) + 1 if used else 1)
        acc = None
        # Horner over giant blocks: acc = block_q + rot(acc, g), from the last block down.
        for q in reversed(range(self.plan.giant)):
            terms = []
            for r, plain in enumerate(self.plains[q]):
                if plain is not None:
                    term = sealapi.Ciphertext()
                    ev.multiply_plain(rotated[r], plain, term)
                    terms.append(term)
            if acc is not None:
                ev.rotate_vector_inplace(acc, self.plan.baby, keys)
                terms.append(acc)
            if terms:
                acc = sealapi.Ciphertext()
                ev.add_many(terms, acc)
        if acc is None:
            raise ValueError("the weight matrix is all zeros")
        for step in self.plan.fold_steps():
            shifted = sealapi.Ciphertext()
            ev.rotate_vector(acc, step, keys, shifted)
            ev.add_inplace(acc, shifted)
        ev.rescale_to_next_inplace(acc)
        if self.bias is not None:
            ev.add_plain_inplace(acc, self.bias)
        return acc
