"""Bridge from a TenSEAL context to the raw SEAL objects of ``tenseal.sealapi``.

TenSEAL's high-level vectors re-encode weights and rotate once per row, which
is too slow for matrix products, but its C++ objects live in a different
extension module from ``tenseal.sealapi`` and cannot be passed across. SEAL
objects only (de)serialize through file paths in these bindings, so every
hand-over goes through a private temporary file (in RAM under /dev/shm where
available); key material touches such a file only on the client side.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator, Sequence

import numpy as np
import tenseal as ts
from tenseal import sealapi

_TMP_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None


@contextlib.contextmanager
def _scratch_path() -> Iterator[str]:
    """A fresh 0600 file path, removed afterwards whatever happens."""
    fd, path = tempfile.mkstemp(prefix="securecollab-he-", dir=_TMP_DIR)
    os.close(fd)
    try:
        yield path
    finally:
        os.unlink(path)


def save_bytes(obj) -> bytes:
    """Serialize any SEAL object (either binding) with a ``save(path)`` method."""
    with _scratch_path() as path:
        obj.save(path)
        with open(path, "rb") as f:
            return f.read()


def load_into(obj, seal_context, data: bytes):
    """Fill a fresh SEAL object from bytes written by :func:`save_bytes`; returns it."""
    with _scratch_path() as path:
        with open(path, "wb") as f:
            f.write(data)
        if seal_context is None:
            obj.load(path)
        else:
            obj.load(seal_context, path)
    return obj


class SealKit:
    """The raw SEAL objects matching one TenSEAL CKKS context.

    ``galois_keys`` may be given separately because TenSEAL can only
    generate keys for every power-of-two step, while a compiled model
    needs keys for a few specific steps.
    """

    def __init__(self, ctx: ts.Context, galois_keys: bytes | None = None):
        # Same parameters give the same parms_ids, so ciphertexts move freely.
        parms_bytes = save_bytes(ctx.seal_context().data.key_context_data().parms())
        parms = load_into(sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS), None, parms_bytes)
        self.context = sealapi.SEALContext(parms, True, sealapi.SEC_LEVEL_TYPE.TC128)
        self.encoder = sealapi.CKKSEncoder(self.context)
        self.evaluator = sealapi.Evaluator(self.context)
        self.slot_count = self.encoder.slot_count()
        self.scale = ctx.global_scale
        self.relin_keys = self._load_key(sealapi.RelinKeys(), ctx.relin_keys().data) if ctx.has_relin_keys() else None
        self.public_key = self._load_key(sealapi.PublicKey(), ctx.public_key().data) if ctx.has_public_key() else None
        self.secret_key = self._load_key(sealapi.SecretKey(), ctx.secret_key().data) if ctx.is_private() else None
        self.galois_keys = None
        if galois_keys is not None:
            self.galois_keys = load_into(sealapi.GaloisKeys(), self.context, galois_keys)
        self.encryptor = None
        if self.secret_key is not None and self.public_key is not None:
            # The client may also encrypt symmetrically (see encrypt_bytes).
            self.encryptor = sealapi.Encryptor(self.context, self.public_key, self.secret_key)
        elif self.public_key is not None:
            self.encryptor = sealapi.Encryptor(self.context, self.public_key)
        self.decryptor = sealapi.Decryptor(self.context, self.secret_key) if self.secret_key else None

    def _load_key(self, empty, ts_key):
        return load_into(empty, self.context, save_bytes(ts_key))

    # -- parameter chain ---------------------------------------------------

    def level_parms(self) -> list:
        """parms_ids from the fresh-ciphertext level down to the last one."""
        out, data = [], self.context.first_context_data()
        while data is not None:
            out.append(data.parms_id())
            data = data.next_context_data()
        return out

    def level_primes(self) -> list[int]:
        """The prime dropped by a rescale at each level, in level_parms order."""
        primes = []
        data = self.context.first_context_data()
        while data is not None:
            primes.append(data.parms().coeff_modulus()[-1].value())
            data = data.next_context_data()
        return primes

    # -- keys ---------------------------------------------------------------

    def make_galois_keys(self, steps: Sequence[int]) -> bytes:
        """Galois keys for exactly these rotation steps (needs the secret key)."""
        if self.secret_key is None:
            raise ValueError("Galois keys need the secret key")
        keygen = sealapi.KeyGenerator(self.context, self.secret_key)
        # The bindings resolve a list to the Galois-element overload, so map
        # rotation steps to elements first.
        tool = self.context.key_context_data().galois_tool()
        elements = tool.get_elts_from_steps(sorted({int(s) for s in steps}))
        return save_bytes(keygen.create_galois_keys(elements))

    # -- encoding and encryption ------------------------------------------

    def encode(self, values: np.ndarray, parms_id, scale: float) -> sealapi.Plaintext:
        plain = sealapi.Plaintext()
        self.encoder.encode([float(v) for v in values], parms_id, scale, plain)
        return plain

    def encode_constant(self, value: float, parms_id, scale: float) -> sealapi.Plaintext:
        """value in every slot (cheaper to encode than a vector)."""
        plain = sealapi.Plaintext()
        self.encoder.encode(float(value), parms_id, scale, plain)
        return plain

    def encrypt(self, values: np.ndarray) -> sealapi.Ciphertext:
        if self.encryptor is None:
            raise ValueError("this context has no public key to encrypt with")
        ct = sealapi.Ciphertext(self.context)
        self.encryptor.encrypt(self._fresh_plain(values), ct)
        return ct

    def encrypt_bytes(self, values: np.ndarray) -> bytes:
        """Wire form of an encryption, about half the size of ``ciphertext_bytes(encrypt(...))``.

        With the secret key at hand (the client), SEAL's symmetric encryption
        makes the ciphertext's second polynomial pseudo-random and serializes
        only its seed; the receiver's ``ciphertext_from_bytes`` expands it.
        Without it, this is an ordinary public-key encryption.
        """
        if self.secret_key is None:
            return self.ciphertext_bytes(self.encrypt(values))
        return save_bytes(self.encryptor.encrypt_symmetric(self._fresh_plain(values)))

    def _fresh_plain(self, values: np.ndarray) -> sealapi.Plaintext:
        if len(values) > self.slot_count:
            raise ValueError(f"{len(values)} values do not fit in {self.slot_count} slots")
        return self.encode(values, self.context.first_parms_id(), self.scale)

    def decrypt(self, ct: sealapi.Ciphertext) -> np.ndarray:
        if self.decryptor is None:
            raise ValueError("this context holds no secret key: it cannot decrypt")
        plain = sealapi.Plaintext()
        self.decryptor.decrypt(ct, plain)
        return np.asarray(self.encoder.decode_double(plain))

    def ciphertext_bytes(self, ct: sealapi.Ciphertext) -> bytes:
        return save_bytes(ct)

    def ciphertext_from_bytes(self, data: bytes) -> sealapi.Ciphertext:
        return load_into(sealapi.Ciphertext(), self.context, data)

    def load_fresh(self, data: bytes) -> sealapi.Ciphertext:
        """A client's freshly encrypted input, refused (ValueError) unless it is one.

        SEAL checks the bytes are a valid ciphertext for these parameters; a
        fresh input must also sit at the top level, at the context's scale,
        with two polynomials, or evaluation would silently compute garbage.
        """
        try:
            ct = self.ciphertext_from_bytes(data)
        except (RuntimeError, ValueError) as e:  # what SEAL raises for foreign or damaged bytes
            raise ValueError(f"not a ciphertext for this session's parameters ({e})") from None
        if ct.parms_id() != self.context.first_parms_id():
            raise ValueError("the ciphertext is not at the top level of this session's modulus chain")
        if ct.size() != 2 or not ct.is_ntt_form():
            raise ValueError(f"expected a fresh 2-polynomial NTT-form ciphertext, got size {ct.size()}")
        if not (np.isfinite(ct.scale) and abs(ct.scale / self.scale - 1) <= 1e-9):
            raise ValueError(f"ciphertext scale 2^{np.log2(ct.scale):.1f} != the session's 2^{np.log2(self.scale):.1f}")
        return ct
