"""CKKS contexts sized for a model's depth, and their secret-free wire form.

The client builds a private context with :func:`make_context`, keeps the
secret key, and sends :func:`public_bytes` to the server, which opens it with
:func:`load_public`. The coefficient-modulus chain is
``[scale_bits + headroom_bits] + [scale_bits] * depth + [scale_bits + headroom_bits + 4]``:
the first prime holds the decrypted result (its ``headroom_bits`` above the
scale hold the value's integer part and sign), each middle prime is dropped
by one rescale, and the last is SEAL's key-switching prime. Key-switching
noise (every rotation and relinearization) shrinks with that prime's size:
with 38 bits instead of 41, block rotations left a 10x larger logit error. SEAL refuses chains longer
than its 128-bit security table allows for the ring degree, so the degree is
the smallest one whose budget fits the chain.

The defaults (28-bit scale, 9 bits of headroom: values up to ~250) fit a
depth-5 model -- the 3-layer square MLP -- in degree 8192, which halves
ciphertexts and more than halves the cost of every operation compared with
degree 16384 (chain 37 + 5*28 + 41 = 218 bits, the whole 8192 budget); the
digits model's logit error stays around 2e-3.
"""

from __future__ import annotations

import struct

import tenseal as ts

from securecollab.he.seal import SealKit

# Largest total coefficient-modulus bits for 128-bit security (SEAL's table).
MAX_MODULUS_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
MAX_PRIME_BITS = 60  # SEAL's limit for one coefficient-modulus prime
DEFAULT_SCALE_BITS = 28
DEFAULT_HEADROOM_BITS = 9
KEY_SWITCH_EXTRA_BITS = 4

_MAGIC = b"SCHE1"


def modulus_chain(depth: int, scale_bits: int = DEFAULT_SCALE_BITS,
                  headroom_bits: int = DEFAULT_HEADROOM_BITS) -> list[int]:
    """Bit sizes of the coefficient-modulus primes for ``depth`` rescales."""
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    outer = scale_bits + headroom_bits
    special = outer + KEY_SWITCH_EXTRA_BITS
    if scale_bits < 20 or headroom_bits < 1 or special > MAX_PRIME_BITS:
        raise ValueError(f"need scale_bits >= 20, headroom_bits >= 1 and their sum <= {MAX_PRIME_BITS - KEY_SWITCH_EXTRA_BITS}, "
                         f"got {scale_bits} and {headroom_bits}")
    return [outer] + [scale_bits] * depth + [special]


def smallest_degree(chain: list[int], minimum: int = 8192) -> int:
    """The smallest ring degree >= minimum whose security budget holds the chain."""
    total = sum(chain)
    for degree in sorted(MAX_MODULUS_BITS):
        if degree >= minimum and total <= MAX_MODULUS_BITS[degree]:
            return degree
    raise ValueError(f"a {total}-bit modulus chain exceeds every supported ring degree")


def default_parameters(depth: int) -> dict:
    """The CKKS parameters :func:`make_context` picks for ``depth`` by default, as the HE service
    describes them to clients: ring degree, coefficient-modulus prime sizes, and the scale's bits."""
    chain = modulus_chain(depth)
    return {"poly_modulus_degree": smallest_degree(chain), "coeff_mod_bit_sizes": chain,
            "scale_bits": DEFAULT_SCALE_BITS}


def make_context(depth: int, *, poly_modulus_degree: int | None = None,
                 scale_bits: int = DEFAULT_SCALE_BITS,
                 headroom_bits: int = DEFAULT_HEADROOM_BITS) -> ts.Context:
    """A private CKKS context (secret, public and relinearization keys) for ``depth`` rescales.

    No Galois keys are generated here: :func:`public_bytes` makes only the
    ones a model asks for.
    """
    chain = modulus_chain(depth, scale_bits, headroom_bits)
    if poly_modulus_degree is None:
        poly_modulus_degree = smallest_degree(chain)
    limit = MAX_MODULUS_BITS.get(poly_modulus_degree)
    if limit is None:
        raise ValueError(f"unsupported poly_modulus_degree {poly_modulus_degree}")
    if sum(chain) > limit:
        raise ValueError(
            f"{sum(chain)} modulus bits exceed the 128-bit-security limit of {limit} "
            f"for degree {poly_modulus_degree}; use a larger degree or a smaller depth"
        )
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree, coeff_mod_bit_sizes=chain)
    ctx.global_scale = 2.0 ** scale_bits
    # We rescale and switch levels ourselves on the raw SEAL objects.
    ctx.auto_rescale = False
    ctx.auto_mod_switch = False
    return ctx


def public_bytes(ctx: ts.Context, galois_steps) -> bytes:
    """The context without its secret key, plus Galois keys for exactly ``galois_steps``.

    Layout: magic, 8-byte big-endian length, TenSEAL public context (public
    and relinearization keys), then SEAL Galois keys (may be empty).
    """
    if not ctx.is_private():
        raise ValueError("public_bytes needs the client's private context")
    context = ctx.serialize(save_public_key=True, save_secret_key=False,
                            save_galois_keys=False, save_relin_keys=True)
    steps = sorted({int(s) for s in galois_steps})
    galois = SealKit(ctx).make_galois_keys(steps) if steps else b""
    return _MAGIC + struct.pack(">Q", len(context)) + context + galois


def split_public(data: bytes) -> tuple[bytes, bytes]:
    """(TenSEAL context bytes, SEAL Galois key bytes) of a :func:`public_bytes` blob."""
    head = len(_MAGIC) + 8
    if len(data) < head or not data.startswith(_MAGIC):
        raise ValueError("not a securecollab public HE context")
    (n,) = struct.unpack(">Q", data[len(_MAGIC):head])
    if head + n > len(data):
        raise ValueError("truncated public HE context")
    return data[head:head + n], data[head + n:]


class PublicContext:
    """What the server holds: a secret-free TenSEAL context and its SEAL kit."""

    def __init__(self, context: ts.Context, kit: SealKit):
        self.context = context
        self.kit = kit


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("malformed HE context (bad varint)")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


MAX_FIELDS = 64  # TenSEAL's messages have 3-5 fields; a flood of tiny ones is an attack on the parser


def _fields(data: bytes, keep: set[int] | None = None) -> dict[int, list[bytes | int]]:
    """Top-level fields of a protobuf message, read at the wire level (no schema needed).

    Only the field numbers in ``keep`` (all if None) are returned; at most
    MAX_FIELDS fields are read.
    """
    out: dict[int, list] = {}
    pos, count = 0, 0
    while pos < len(data):
        count += 1
        if count > MAX_FIELDS:
            raise ValueError("malformed HE context (too many fields)")
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            n, pos = _varint(data, pos)
            if pos + n > len(data):
                raise ValueError("malformed HE context (truncated field)")
            value, pos = data[pos:pos + n], pos + n
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        else:
            raise ValueError(f"malformed HE context (wire type {wire})")
        if keep is None or number in keep:
            out.setdefault(number, []).append(value)
    return out


# TenSEALContextProto.private_context = 3, and TenSEALPrivateProto.secret_key = 1 (tenseal/proto/tensealcontext.proto).
_PRIVATE_CONTEXT, _SECRET_KEY = 3, 1


def carries_secret_key(context_bytes: bytes) -> bool:
    """Whether a serialized TenSEAL context holds a secret key, decided before anything is deserialized.

    Checking after ``ts.context_from`` would already have put the key in
    this process's memory; this looks at the protobuf fields instead.
    """
    for private in _fields(context_bytes, keep={_PRIVATE_CONTEXT}).get(_PRIVATE_CONTEXT, []):
        if isinstance(private, bytes) and any(_fields(private, keep={_SECRET_KEY}).get(_SECRET_KEY, [])):
            return True
    return False


def load_public(data: bytes) -> PublicContext:
    """Open a client's context on the server; refuses one that carries a secret key."""
    context_bytes, galois = split_public(data)
    if carries_secret_key(context_bytes):
        raise ValueError("refusing a context that carries a secret key")
    ctx = ts.context_from(context_bytes)
    if ctx.is_private() or ctx.has_secret_key():
        raise ValueError("refusing a context that carries a secret key")
    if not ctx.has_relin_keys():
        raise ValueError("the context carries no relinearization keys")
    return PublicContext(ctx, SealKit(ctx, galois_keys=galois or None))
