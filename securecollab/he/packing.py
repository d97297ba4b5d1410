"""A compact wire form for a result ciphertext: coefficients at the last level, low bits rounded away, bit-packed.

A result comes back at the last level of the modulus chain (one prime q of ~37 bits), where SEAL stores each
coefficient in a 64-bit word and zstd wins back only part of the slack. Here the server takes the ciphertext
out of NTT form and rounds each coefficient of c0 to a multiple of 2^b0 and of c1 to a multiple of 2^b1,
sending only the high bits. Decryption computes c0 + c1·s: c0's rounding adds at most 2^(b0-1) per
coefficient, c1's is multiplied by the ternary secret s, hence the smaller b1. With b0 = 11, b1 = 7 the
added error is ~1e-3 per slot at scale 2^28 (CKKS's own is ~1e-4; tests/test_he_packing.py measures both),
and a single query's reply falls from ~91 KB to ~57 KB. Rounding is the server's own deterministic post-
processing of a ciphertext it computed, so the client learns nothing it did not before.

The receiver rebuilds an ordinary SEAL ciphertext (SEAL's uncompressed serialization, written here: a
16-byte header, then parms_id, the NTT flag, size, degree, modulus count, scale, correction factor, and the
coefficients as a nested array), moves it back into NTT form and decrypts as usual.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

import numpy as np
from tenseal import sealapi

from securecollab.he.seal import SealKit, load_into, save_bytes

DROPPED_BITS = (11, 7)  # (c0, c1)
_SEAL_MAGIC = 0xA15E


@dataclass(frozen=True)
class PackedCiphertext:
    modulus: int
    scale: float
    degree: int
    dropped_bits: tuple[int, int]
    value_bits: tuple[int, int]
    values: bytes

    @property
    def nbytes(self) -> int:
        return len(self.values)


def pack(kit: SealKit, ct: sealapi.Ciphertext, dropped_bits: tuple[int, int] = DROPPED_BITS) -> PackedCiphertext:
    """The compact form of a 2-polynomial NTT-form ciphertext (server side; ``ct`` is left as is), first
    switched down to the last level if it is above it (the decryption needs only the first prime)."""
    if ct.size() != 2 or not ct.is_ntt_form():
        raise ValueError(f"only a relinearized NTT-form ciphertext packs (size {ct.size()})")
    last = kit.level_parms()[-1]
    q = kit.context.get_context_data(last).parms().coeff_modulus()[0].value()
    coefficient_form = sealapi.Ciphertext(kit.context)
    if ct.parms_id() == last:
        kit.evaluator.transform_from_ntt(ct, coefficient_form)
    else:
        kit.evaluator.mod_switch_to(ct, last, coefficient_form)
        kit.evaluator.transform_from_ntt_inplace(coefficient_form)
    data = coefficient_form.dyn_array()
    coefficients = np.fromiter((data.at(i) for i in range(data.size())), dtype=np.uint64, count=data.size())
    n = ct.poly_modulus_degree()
    parts, widths = [], []
    for poly, b in zip((coefficients[:n], coefficients[n:]), dropped_bits):
        high = (poly + np.uint64(1 << (b - 1))) >> np.uint64(b)  # round to nearest
        width = _width(q, b)
        parts.append(_pack_bits(high, width))
        widths.append(width)
    return PackedCiphertext(q, float(ct.scale), n, tuple(dropped_bits), tuple(widths), b"".join(parts))


def unpack(kit: SealKit, packed: PackedCiphertext) -> sealapi.Ciphertext:
    """The ciphertext again, in NTT form, ready for ``kit.decrypt`` (client side); ValueError on bad input."""
    n, q = packed.degree, packed.modulus
    last = kit.level_parms()[-1]
    last_q = kit.context.get_context_data(last).parms().coeff_modulus()[0].value()
    if n != kit.slot_count * 2 or q != last_q:
        raise ValueError(f"a packed result for degree {n}, modulus {q}; this context has {kit.slot_count * 2}, {last_q}")
    if len(packed.dropped_bits) != 2 or len(packed.value_bits) != 2 \
            or any(not 1 <= b < 30 for b in packed.dropped_bits) \
            or any(w != _width(q, b) for w, b in zip(packed.value_bits, packed.dropped_bits)):
        raise ValueError(f"inconsistent packing: dropped {packed.dropped_bits}, widths {packed.value_bits}")
    sizes = [(n * w + 7) // 8 for w in packed.value_bits]
    if len(packed.values) != sum(sizes):
        raise ValueError(f"packed values hold {len(packed.values)} bytes, expected {sum(sizes)}")
    if not (np.isfinite(packed.scale) and packed.scale > 1):
        raise ValueError(f"bad scale {packed.scale}")
    polys, offset = [], 0
    for size, width, b in zip(sizes, packed.value_bits, packed.dropped_bits):
        high = _unpack_bits(packed.values[offset:offset + size], width, n)
        offset += size
        polys.append((high << np.uint64(b)) % np.uint64(q))
    ct = load_into(sealapi.Ciphertext(), kit.context, _seal_ciphertext_bytes(last, np.concatenate(polys),
                                                                              n, packed.scale))
    kit.evaluator.transform_to_ntt_inplace(ct)
    return ct


def _width(q: int, b: int) -> int:
    """Bits of the largest rounded coefficient, (q - 1 + 2^(b-1)) >> b."""
    return ((q - 1 + (1 << (b - 1))) >> b).bit_length()


def _pack_bits(values: np.ndarray, width: int) -> bytes:
    bits = ((values[:, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def _unpack_bits(data: bytes, width: int, count: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[:count * width].reshape(count, width)
    return (bits.astype(np.uint64) << np.arange(width, dtype=np.uint64)).sum(1, dtype=np.uint64)


def _seal_header(body_size: int) -> bytes:
    major, minor = _seal_version()
    return struct.pack("<HBBBBHQ", _SEAL_MAGIC, 16, major, minor, 0, 0, 16 + body_size)  # compression: none


@functools.cache
def _seal_version() -> tuple[int, int]:
    """This SEAL's serialization version, read from a header it wrote."""
    head = save_bytes(sealapi.Plaintext())[:16]
    return head[3], head[4]


def _seal_ciphertext_bytes(parms_id, coefficients: np.ndarray, degree: int, scale: float) -> bytes:
    """SEAL's uncompressed serialization of a 2-polynomial, 1-prime ciphertext in coefficient form."""
    array = struct.pack("<Q", len(coefficients)) + coefficients.astype("<u8").tobytes()
    body = (np.asarray(list(parms_id), dtype="<u8").tobytes() + b"\x00"  # parms_id; not in NTT form
            + struct.pack("<QQQdQ", 2, degree, 1, scale, 1)  # size, degree, primes, scale, correction factor
            + _seal_header(len(array)) + array)
    return _seal_header(len(body)) + body
