"""Batched encrypted inference: input ``k`` of a batch in slot ``k`` of every ciphertext (see he/net.py).

Several features share a ciphertext when the batch leaves slots free
(:class:`BatchLayout`): a linear layer is then a block-diagonal
multiply-accumulate across ciphertexts, with rotations by whole blocks only
(none for a full batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tenseal import sealapi
from torch import nn

from securecollab.he.linear import next_pow2, rotations_pow2
from securecollab.he.lower import affine_layers
from securecollab.he.net import check_galois_keys, kit_of, square_in_place
from securecollab.he.seal import SealKit


@dataclass(frozen=True)
class BatchLayout:
    """Where feature ``f`` of input ``k`` sits when a batch of ``batch_size`` inputs is packed.

    Each input's slot index ``k`` is padded to a ``block`` of ``next_pow2(batch_size)``
    slots, so a ciphertext holds ``groups = slot_count // block`` blocks, and
    feature ``f`` goes to block ``f % groups`` of ciphertext ``f // groups``.
    A full batch (one block per ciphertext) needs no rotation at all; a small
    one fills the otherwise idle slots with more features, cutting the
    ciphertext count, the plaintext products and the squares by ``groups``
    at the price of rotations by whole blocks.
    """

    batch_size: int
    slot_count: int

    def __post_init__(self):
        if not 1 <= self.batch_size <= self.slot_count:
            raise ValueError(f"batch size {self.batch_size} must be in [1, {self.slot_count}]; split the batch")

    @property
    def block(self) -> int:
        return next_pow2(self.batch_size)

    @property
    def groups(self) -> int:
        return self.slot_count // self.block

    def n_ciphertexts(self, features: int) -> int:
        return -(-features // self.groups)

    def galois_steps(self) -> list[int]:
        """Block rotations by ``block * 2**k``: enough to make every block shift."""
        return [self.block << k for k in range((self.groups - 1).bit_length())]

    def pack(self, x: np.ndarray) -> list[np.ndarray]:
        """(batch_size, features) -> one slot vector per ciphertext."""
        n, features = x.shape
        cube = np.zeros((self.n_ciphertexts(features) * self.groups, self.block))
        cube[:features, :n] = x.T
        return list(cube.reshape(-1, self.slot_count))

    def unpack(self, slots: list[np.ndarray], features: int) -> np.ndarray:
        """Inverse of :meth:`pack`: (batch_size, features)."""
        cube = np.concatenate([np.asarray(v).reshape(self.groups, self.block) for v in slots])
        return cube[:features, :self.batch_size].T

    def block_weights(self, weight: np.ndarray) -> np.ndarray:
        """(C_out, C_in, groups, groups) array: [o, c, r, g] multiplies block g of rot(x_c, r blocks).

        Block g of output ciphertext o is feature ``o*G + g``; rotating input
        ``c`` by ``r`` blocks brings feature ``c*G + (g + r) % G`` there.
        """
        g_ = self.groups
        c_out, c_in = self.n_ciphertexts(weight.shape[0]), self.n_ciphertexts(weight.shape[1])
        padded = np.zeros((c_out * g_, c_in * g_))
        padded[:weight.shape[0], :weight.shape[1]] = weight
        g = np.arange(g_)
        rows = np.arange(c_out)[:, None, None, None] * g_ + g            # [o, 1, 1, g]
        cols = (np.arange(c_in)[None, :, None, None] * g_
                + (g + np.arange(g_)[:, None]) % g_)                      # [1, c, r, g]
        return padded[rows, cols]


@dataclass(frozen=True)
class _Constant:
    """A weight that is the same in every slot, encoded only when multiplied."""

    value: float
    parms_id: object
    scale: float

    def encode(self, kit: SealKit, into: sealapi.Plaintext) -> sealapi.Plaintext:
        kit.encoder.encode(self.value, self.parms_id, self.scale, into)
        return into


class HENetBatched:
    """SIMD across inputs: slot ``k`` of each block holds input ``k`` (see :class:`BatchLayout`)."""

    def __init__(self, layers: list[tuple[np.ndarray, np.ndarray]]):
        self.layers = layers
        self.kit: SealKit | None = None
        self.layout: BatchLayout | None = None
        self._compiled = None

    @classmethod
    def from_torch(cls, model: nn.Module, input_shape: tuple[int, ...]) -> "HENetBatched":
        return cls(affine_layers(model, input_shape))

    @property
    def in_features(self) -> int:
        return self.layers[0][0].shape[1]

    @property
    def out_features(self) -> int:
        return self.layers[-1][0].shape[0]

    @property
    def depth(self) -> int:
        return 2 * len(self.layers) - 1

    @staticmethod
    def galois_steps(batch_size: int, slot_count: int) -> list[int]:
        """Rotation keys a batch of this size needs (none for a full batch)."""
        return BatchLayout(batch_size, slot_count).galois_steps()

    def bind(self, ctx, batch_size: int) -> "HENetBatched":
        """Encode every weight once, for batches of ``batch_size`` inputs."""
        kit = kit_of(ctx)
        layout = BatchLayout(batch_size, kit.slot_count)
        if len(kit.level_parms()) <= self.depth:
            raise ValueError(f"the context allows fewer than the {self.depth} rescales this model needs")
        check_galois_keys(kit, layout.galois_steps())
        parms, primes = kit.level_parms(), kit.level_primes()
        compiled, level, scale = [], 0, kit.scale
        for i, (w, b) in enumerate(self.layers):
            compiled.append(self._encode_layer(kit, layout, w, b, parms[level], primes[level],
                                               parms[level + 1], scale))
            level += 1
            if i < len(self.layers) - 1:
                scale = scale * scale / primes[level]
                level += 1
        self.kit, self.layout, self._compiled = kit, layout, compiled
        return self

    @staticmethod
    def _encode_layer(kit, layout, w, b, parms, prime, bias_parms, scale):
        """(plains[o][c][r] or None for an all-zero block diagonal, bias plain per output or None)."""
        def encode(per_block, parms_id, at_scale):
            if np.all(per_block == per_block[0]):
                # One value everywhere (always, for a full batch): keep the number and encode it
                # when used -- 40 us against a 0.5 ms product, and no N*L words held per weight.
                return _Constant(float(per_block[0]), parms_id, at_scale)
            return kit.encode(np.repeat(per_block, layout.block), parms_id, at_scale)

        # The weights' scale equals the prime the rescale drops, so the scale stays put.
        plains = [[[encode(d, parms, prime) if d.any() else None for d in per_c] for per_c in per_o]
                  for per_o in layout.block_weights(w)]
        biases = [None] * len(plains)
        if b is not None and np.any(b):
            padded = np.zeros(len(plains) * layout.groups)
            padded[:len(b)] = b
            biases = [encode(v, bias_parms, scale) if v.any() else None
                      for v in padded.reshape(len(plains), layout.groups)]
        return plains, biases

    def _linear(self, cts, plains, biases):
        kit, ev = self.kit, self.kit.evaluator
        # Rotations are made once per input ciphertext and shared by every output.
        rotated = [rotations_pow2(kit, ct, self.layout.groups, unit=self.layout.block) for ct in cts]
        out, term, scratch = [], sealapi.Ciphertext(), sealapi.Plaintext()
        for per_o, bias in zip(plains, biases):
            acc = None
            for per_c, rots in zip(per_o, rotated):
                for plain, ct in zip(per_c, rots):
                    if plain is None:
                        continue
                    if isinstance(plain, _Constant):
                        plain = plain.encode(kit, scratch)
                    if acc is None:
                        acc = sealapi.Ciphertext()
                        ev.multiply_plain(ct, plain, acc)
                    else:  # accumulate in place: no list of full-size temporaries
                        ev.multiply_plain(ct, plain, term)
                        ev.add_inplace(acc, term)
            if acc is None:
                raise ValueError("a weight row is all zeros")
            ev.rescale_to_next_inplace(acc)  # once per output, after the whole sum
            if bias is not None:
                ev.add_plain_inplace(acc, bias.encode(kit, scratch) if isinstance(bias, _Constant) else bias)
            out.append(acc)
        return out

    def evaluate(self, cts: list[sealapi.Ciphertext]) -> list[sealapi.Ciphertext]:
        """Encrypted logits in the batch layout; :func:`decrypt_batch` reads them."""
        if self._compiled is None:
            raise RuntimeError("call bind(context, batch_size) before evaluate")
        expected = self.layout.n_ciphertexts(self.in_features)
        if len(cts) != expected:
            raise ValueError(f"expected {expected} input ciphertexts for this batch layout, got {len(cts)}")
        for i, (plains, biases) in enumerate(self._compiled):
            cts = self._linear(cts, plains, biases)
            if i < len(self._compiled) - 1:
                for ct in cts:
                    square_in_place(self.kit, ct)
        return cts

    def evaluate_bytes(self, data: list[bytes]) -> list[bytes]:
        """Wire form of :meth:`evaluate`: SEAL ciphertext bytes in and out."""
        return [self.kit.ciphertext_bytes(ct) for ct in self.evaluate([self.kit.load_fresh(d) for d in data])]


def _batch_slots(kit: SealKit, x: np.ndarray, batch_size: int | None) -> list[np.ndarray]:
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    size = batch_size or len(x)
    if len(x) > size:
        raise ValueError(f"{len(x)} inputs exceed the batch size {size}")
    return BatchLayout(size, kit.slot_count).pack(x)


def encrypt_batch(ctx, x: np.ndarray, batch_size: int | None = None) -> list[sealapi.Ciphertext]:
    """Client side: (n, features...) inputs packed by the layout of ``batch_size`` (default n) inputs."""
    kit = kit_of(ctx)
    return [kit.encrypt(v) for v in _batch_slots(kit, x, batch_size)]


def encrypt_batch_bytes(ctx, x: np.ndarray, batch_size: int | None = None) -> list[bytes]:
    """Wire form of :func:`encrypt_batch` (seeded symmetric encryption: half the bytes)."""
    kit = kit_of(ctx)
    return [kit.encrypt_bytes(v) for v in _batch_slots(kit, x, batch_size)]


def decrypt_batch(ctx, cts: list[sealapi.Ciphertext], n: int, n_classes: int,
                  batch_size: int | None = None) -> np.ndarray:
    """Client side: (n, n_classes) logits from the batch-layout result ciphertexts."""
    kit = kit_of(ctx)
    return BatchLayout(batch_size or n, kit.slot_count).unpack([kit.decrypt(ct) for ct in cts], n_classes)[:n]
