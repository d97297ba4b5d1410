"""Additive secret sharing of client updates over Z_{2^64}, with seed-compressed shares.

A client encodes its float update in fixed point with CrypTen's default scale
(16 fractional bits, int64 ring with wrap-around) and splits it into one
additive share per compute party. Any n-1 shares are uniformly random and so
say nothing about the update; all n summed modulo 2^64 give it back.

With seed compression, parties 1..n-1 get a 32-byte seed instead of a dense
share: the share is the seed's AES-256-CTR keystream read as int64. Only party 0
gets a dense share, the correction that makes the shares sum to the secret, so
a client uploads one vector plus a few seeds instead of n vectors.

A plain sum (no rule computed inside MPC) needs only residues mod 2^32 (``bits=32``): the secret's
residue is split into uint32 shares, a seed expands to 4-byte words, parties add in uint32, and
``reveal`` sign-extends the sum; half the bytes on the wire, in the PRG and in every addition, provided
the sum's encoding fits in int32 (``narrow_bound``; honest clients refuse updates above it).

Rounding differs from CrypTen on purpose: CrypTen's encoder truncates toward
zero (``(scale * x).long()``, in the input's precision); we scale in float64 and
round to nearest, so the encoding error is at most 2^-17 per value.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

FRAC_BITS = 16
SCALE = 1 << FRAC_BITS

# Sums of up to MAX_CLIENTS encodings must stay inside int64 (|sum| < 2^62), so
# the aggregate decodes to the true sum instead of wrapping to the other sign.
MAX_CLIENTS = 64
MAX_ABS = 2.0 ** (62 - FRAC_BITS) / MAX_CLIENTS  # 2^40, about 1.1e12

SEED_BYTES = 32
# The keystream of AES-256 in counter mode: each seed is a fresh key used for exactly one share, so a fixed
# all-zero initial counter never repeats a (key, counter) pair. AES rather than ChaCha20 because the CPU
# computes it (AES-NI): 4.7 GB/s against ChaCha20's 0.9 here, and a round of K = 10 clients at D = 10^6
# expands 40 seeds of 8 MB.
_COUNTER0 = bytes(16)
_PRG_CHUNK = 1 << 20  # bytes of zeros encrypted per call, to bound extra memory


def encode_fixed(x) -> np.ndarray:
    """Float values -> int64 fixed point: round(x * 2^16), same shape as x.

    Refuses NaN/Inf and values with |x| >= MAX_ABS (2^40), whose sums over
    MAX_CLIENTS clients could wrap around the ring.
    """
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise TypeError(f"cannot encode values of dtype {x.dtype}; expected real numbers")
    x = x.astype(np.float64, copy=False)
    peak = float(np.abs(x).max()) if x.size else 0.0  # NaN or Inf when any value is: one pass checks both
    if not math.isfinite(peak):
        bad = ~np.isfinite(x)
        first = tuple(int(i) for i in np.unravel_index(np.argmax(bad), x.shape))
        raise ValueError(f"cannot encode {int(bad.sum())} NaN/Inf value(s), first at index {first}")
    if peak >= MAX_ABS:
        raise ValueError(f"max |x| = {peak:.6g} is not below the safe bound {MAX_ABS:.6g} "
                         f"(2^{62 - FRAC_BITS}/{MAX_CLIENTS}, so sums of {MAX_CLIENTS} clients cannot wrap)")
    # Scaling by a power of two is exact in float64, so rint is the only rounding (in place: one array less).
    scaled = x * SCALE
    np.rint(scaled, out=scaled)
    return scaled.astype(np.int64)


def decode_fixed(v) -> np.ndarray:
    """int64 fixed point -> float64 values: v / 2^16 (negative values are two's complement)."""
    v = np.asarray(v)
    if v.dtype != np.int64:
        raise TypeError(f"fixed-point values must be int64, got {v.dtype}")
    return v.astype(np.float64) / SCALE


def narrow_bound(num_clients: int) -> float:
    """The bound on |x| an update must stay below when a sum of ``num_clients`` updates travels in Z_{2^32}:
    the sum's encoding must stay inside int32 (|sum| < 2^31) to decode to itself instead of wrapping."""
    return 2.0 ** (31 - FRAC_BITS) / max(1, int(num_clients))


def fits_narrow_sum(encoded: np.ndarray, num_clients: int) -> bool:
    """Whether ``num_clients`` encodings no larger than this one sum inside int32. Checked on the encoding, not
    the floats: a value just under narrow_bound may round up to one step above 2^31 / num_clients."""
    peak = int(np.abs(encoded).max()) if encoded.size else 0
    return peak * max(1, int(num_clients)) < 1 << 31


# A ring's elements as numpy stores them: Z_2^64 as int64 (CrypTen's), Z_2^32 as uint32.
RING_DTYPES = {64: np.dtype(np.int64), 32: np.dtype(np.uint32)}
_UNSIGNED = {64: np.uint64, 32: np.uint32}  # where the ring's additions wrap without warnings


def ring_dtype(bits: int) -> np.dtype:
    if bits not in RING_DTYPES:
        raise ValueError(f"ring words are 32 or 64 bits, not {bits!r}")
    return RING_DTYPES[bits]


def to_wire(v: np.ndarray, bits: int) -> bytes:
    """A ring vector's little-endian words: int64, or (bits = 32) its residue mod 2^32 as uint32. Reducing
    mod 2^32 is a ring map (integer casts keep the low bits), so residues of sums are sums of residues."""
    return np.asarray(v).astype(ring_dtype(bits).newbyteorder("<"), copy=False).tobytes()


def from_wire(payload: bytes, bits: int) -> np.ndarray:
    """Ring words from the wire, in the ring's dtype (a fresh, writable array)."""
    return np.frombuffer(payload, dtype=ring_dtype(bits).newbyteorder("<")).astype(ring_dtype(bits))


def reveal(shares: Sequence[np.ndarray], bits: int) -> np.ndarray:
    """The secret from all parties' result shares in Z_{2^bits}, as int64 fixed point (a 32-bit sum is
    sign-extended: see narrow_bound for when that is the true sum)."""
    total = reconstruct(shares)
    return total if bits == 64 else total.astype(np.uint32, copy=False).view(np.int32).astype(np.int64)


def prg_int64(seed: bytes, n: int) -> np.ndarray:
    """Expand a 32-byte seed into n uniformly random int64: the AES-256-CTR keystream under key=seed, counter
    from 0 (the first 16 bytes are AES-256 of the zero block)."""
    return prg_words(seed, n, 64)


def prg_words(seed: bytes, n: int, bits: int = 64) -> np.ndarray:
    """n uniformly random elements of Z_{2^bits} (int64 or uint32): the seed's AES-256-CTR keystream read as
    little-endian words of bits / 8 bytes."""
    dtype = ring_dtype(bits)
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
        raise ValueError(f"seed must be {SEED_BYTES} bytes, got "
                         f"{len(seed) if isinstance(seed, (bytes, bytearray)) else type(seed).__name__}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"length must be a non-negative integer, got {n!r}")
    out = np.empty(int(n), dtype=dtype.newbyteorder("<"))  # little-endian, so a seed expands the same everywhere
    raw = memoryview(out).cast("B")
    encryptor = Cipher(algorithms.AES256(bytes(seed)), modes.CTR(_COUNTER0)).encryptor()
    zeros = bytes(min(len(raw), _PRG_CHUNK))
    # Encrypting zeros yields the bare keystream; write it straight into the result.
    for start in range(0, len(raw), _PRG_CHUNK):
        stop = min(start + _PRG_CHUNK, len(raw))
        encryptor.update_into(zeros[: stop - start], raw[start:stop])
    return out.astype(dtype, copy=False)


@dataclass(frozen=True, eq=False)  # eq=False: == on array fields is ambiguous
class Share:
    """One party's additive share of a client's vector in Z_{2^bits}: a dense vector (int64, or uint32 for
    bits = 32), or a seed that expands to one.

    ``length`` is the vector's element count; for a dense share it defaults to
    ``dense.size`` and must match it when given.
    """

    party: int
    dense: np.ndarray | None = None
    seed: bytes | None = None
    length: int = 0
    bits: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.party, bool) or not isinstance(self.party, (int, np.integer)) or self.party < 0:
            raise ValueError(f"party must be a non-negative integer, got {self.party!r}")
        if isinstance(self.length, bool) or not isinstance(self.length, (int, np.integer)) or self.length < 0:
            raise ValueError(f"length must be a non-negative integer, got {self.length!r}")
        if (self.dense is None) == (self.seed is None):
            raise ValueError("a share carries exactly one of dense or seed")
        dtype = ring_dtype(self.bits)
        if self.seed is not None:
            if not isinstance(self.seed, bytes) or len(self.seed) != SEED_BYTES:
                raise ValueError(f"seed must be {SEED_BYTES} bytes")
            return
        if not isinstance(self.dense, np.ndarray) or self.dense.dtype != dtype or self.dense.ndim != 1:
            raise ValueError(f"dense share must be a 1-D {dtype} numpy array (Z_2^{self.bits})")
        if self.length == 0:
            object.__setattr__(self, "length", self.dense.size)
        elif self.length != self.dense.size:
            raise ValueError(f"dense share has {self.dense.size} elements, length says {self.length}")

    def same_as(self, other: "Share") -> bool:
        """The same share, bit for bit: the same party, ring and length, and the same seed or vector."""
        if (self.party, self.bits, self.length) != (other.party, other.bits, other.length):
            return False
        if self.seed is not None or other.seed is not None:
            return self.seed == other.seed
        return bool(np.array_equal(self.dense, other.dense))

    def expand(self) -> np.ndarray:
        """The share as a vector of the ring (a seed is expanded with prg_words)."""
        return self.dense if self.dense is not None else prg_words(self.seed, self.length, self.bits)


def split_shares(encoded, n_parties: int, *, compress: bool = True,
                 rng_seed_source: Callable[[int], bytes] = os.urandom, bits: int = 64) -> list[Share]:
    """Split a 1-D int64 vector into n_parties additive shares of Z_{2^bits}, party i's at index i.

    Parties 1..n-1 get fresh random masks; party 0 gets ``encoded - sum(masks)``
    (mod 2^bits). With ``compress`` the masks travel as their 32-byte seeds.
    """
    secret = _ring_vector(encoded)
    if isinstance(n_parties, bool) or not isinstance(n_parties, (int, np.integer)) or n_parties < 2:
        raise ValueError(f"need at least 2 parties, got {n_parties!r}")
    n = secret.size
    seeds = [rng_seed_source(SEED_BYTES) for _ in range(1, n_parties)]
    if any(not isinstance(s, bytes) or len(s) != SEED_BYTES for s in seeds):
        raise ValueError(f"rng_seed_source must return {SEED_BYTES} random bytes")
    # Uncompressed masks come from the same CSPRNG (AES-256-CTR of an OS-random seed,
    # never numpy's RNG); the modes differ only in whether the seed or its expansion is sent.
    masks = [prg_words(s, n, bits) for s in seeds]
    # correction = secret - sum(masks) mod 2^bits, in place in one buffer (the hot path of every upload)
    unsigned = _UNSIGNED[bits]
    correction = secret.astype(unsigned)  # one copy; for bits = 32 the secret's residue mod 2^32
    for mask in masks:
        np.subtract(correction, mask.view(unsigned), out=correction)
    correction = correction.view(ring_dtype(bits))
    shares = [Share(party=0, dense=correction, length=n, bits=bits)]
    for party, (seed, mask) in enumerate(zip(seeds, masks), start=1):
        shares.append(Share(party=party, seed=seed, length=n, bits=bits) if compress
                      else Share(party=party, dense=mask, length=n, bits=bits))
    return shares


def client_shares(client_id: str, round_: int, update: np.ndarray, n_parties: int, *,
                  compress: bool = True, bits: int = 64, sum_of: int | None = None) -> list[Share]:
    """One client's update for one round, encoded and split: share i goes to compute party i.

    Additive shares are interchangeable, so which party gets the dense
    correction rotates with (client, round): with seed compression, the
    parties' ingestion work spreads over all of them instead of party 0.
    With bits = 32 and ``sum_of`` (the number of clients summed), an update whose sum with as many
    others could wrap around Z_2^32 is refused (ValueError) before anything is split."""
    encoded = encode_fixed(update)
    if bits == 32 and sum_of is not None and not fits_narrow_sum(encoded, sum_of):
        raise ValueError(f"max |update| = {float(np.abs(update).max()):.9g} is not below "
                         f"{narrow_bound(sum_of):.9g} (2^15 / {sum_of} clients) once encoded, so the plain sum "
                         "in Z_2^32 could wrap: use the 64-bit ring (SecAggPlan.narrow_ring=false, --wide-ring)")
    shares = split_shares(encoded, n_parties, compress=compress, bits=bits)
    offset = zlib.crc32(f"{client_id}/{round_}".encode()) % n_parties
    rotated = [Share(party=(s.party + offset) % n_parties, dense=s.dense, seed=s.seed, length=s.length, bits=bits)
               for s in shares]
    return sorted(rotated, key=lambda s: s.party)


def add_shares(arrays: Iterable[np.ndarray]) -> np.ndarray:
    """Element-wise sum of ring vectors: int64 modulo 2^64, or uint32 modulo 2^32 (wraps around, never warns)."""
    arrays = [np.asarray(a) for a in arrays]
    if not arrays:
        raise ValueError("nothing to add")
    dtype = arrays[0].dtype
    for a in arrays:
        if a.dtype != dtype or dtype not in (np.int64, np.uint32):
            raise TypeError(f"shares must be all int64 or all uint32, got {a.dtype} beside {dtype}")
        if a.shape != arrays[0].shape:
            raise ValueError(f"share shapes differ: {arrays[0].shape} vs {a.shape}")
    # Unsigned addition is defined to wrap, so do the ring arithmetic unsigned.
    unsigned = _UNSIGNED[64 if dtype == np.int64 else 32]
    total = arrays[0].view(unsigned).copy()
    for a in arrays[1:]:
        np.add(total, a.view(unsigned), out=total)
    return total.view(dtype)


def reconstruct(shares: Sequence[np.ndarray | Share]) -> np.ndarray:
    """The secret ring vector from all parties' shares (arrays, or Share objects to expand)."""
    return add_shares(s.expand() if isinstance(s, Share) else s for s in shares)


def _ring_vector(encoded) -> np.ndarray:
    v = np.asarray(encoded)
    if v.dtype != np.int64 or v.ndim != 1:
        raise ValueError(f"expected a 1-D int64 vector (see encode_fixed), got {v.dtype} of shape {v.shape}")
    return v

