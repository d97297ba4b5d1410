"""Encrypted inference for a square-activation network: one query per ciphertext (the batched form: he/batched.py).

The network arrives as affine maps separated by squares
(:func:`securecollab.he.lower.affine_layers`: MLPs, and CNNs whose
convolutions are lowered to im2col matrices). :class:`HENet` packs one input vector (repeated over the slots) in a single
ciphertext and runs the diagonal BSGS layers of :mod:`securecollab.he.linear`.
:class:`HENetBatched` puts input ``k`` of a batch in slot ``k`` of every
ciphertext, several features per ciphertext when the batch leaves slots
free (:class:`BatchLayout`): a linear layer is then a block-diagonal
multiply-accumulate across ciphertexts, with rotations by whole blocks
only (none for a full batch).

Both take the model's weights with :meth:`from_torch` (no context needed, so
the client can read ``depth`` and ``galois_steps`` to build its keys) and
encode them once for a server context with :meth:`bind`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import tenseal as ts
from tenseal import sealapi
from torch import nn

from securecollab.he.context import PublicContext
from securecollab.he.conv import Im2colConv, Im2colGeometry
from securecollab.he.linear import DiagonalPlan, EncryptedLinear, next_pow2, replicate
from securecollab.he.lower import affine_layers
from securecollab.he.seal import SealKit


def kit_of(ctx) -> SealKit:
    """The SEAL objects of a TenSEAL context, a PublicContext or a SealKit (cached per context)."""
    if isinstance(ctx, SealKit):
        return ctx
    if isinstance(ctx, PublicContext):
        return ctx.kit
    kit = _KITS.get(ctx)
    if kit is None:
        kit = _KITS[ctx] = SealKit(ctx)
    return kit


_KITS: "weakref.WeakKeyDictionary[ts.Context, SealKit]" = weakref.WeakKeyDictionary()


def check_galois_keys(kit: SealKit, steps) -> None:
    """Refuse at bind time a context that cannot make the rotations a model needs."""
    if not steps:
        return
    if kit.galois_keys is None:
        raise ValueError("the context has no Galois keys; send public_bytes(ctx, <the model's galois steps>)")
    tool = kit.context.key_context_data().galois_tool()
    for step in steps:
        if not kit.galois_keys.has_key(tool.get_elt_from_step(step)):
            raise ValueError(f"the context lacks the Galois key for rotation step {step}")


def square_in_place(kit: SealKit, ct: sealapi.Ciphertext) -> None:
    kit.evaluator.square_inplace(ct)
    kit.evaluator.relinearize_inplace(ct, kit.relin_keys)
    kit.evaluator.rescale_to_next_inplace(ct)


@dataclass(frozen=True)
class InputEncoding:
    """How a client lays out one input for :class:`HENet` (public: the server sends it).

    Without ``im2col`` the flattened input is zero-padded to a power of two
    and repeated over all slots; with it, the input is unfolded into the
    first convolution's patches (:class:`Im2colGeometry`).
    """

    features: int
    im2col: Im2colGeometry | None = None

    @property
    def ciphertexts(self) -> int:
        """Ciphertexts one input takes (several only for an im2col layout split into groups)."""
        return self.im2col.ciphertexts if self.im2col is not None else 1

    def slots(self, x: np.ndarray, slot_count: int) -> np.ndarray:
        """(ciphertexts, slot_count): the values each of the input's ciphertexts encrypts."""
        x = np.asarray(x, dtype=np.float64)
        if x.size != self.features:
            raise ValueError(f"expected an input of {self.features} values, got {x.size}")
        if self.im2col is not None:
            return self.im2col.input_slots(x, slot_count)
        return replicate(x.ravel(), next_pow2(self.features), slot_count)[None]

    @property
    def period(self) -> int:
        """Slots one copy of the layout takes (the slot count is a multiple of it)."""
        return self.im2col.period if self.im2col is not None else next_pow2(self.features)

    def slot_sources(self) -> list[int]:
        """The layout as data, for clients written elsewhere: slot i of one period holds input value
        ``sources[i]`` of the flattened input, or 0 where it is -1 (padding, unused slots); with several
        ciphertexts, ciphertext c's period follows ciphertext c-1's."""
        marks = self.slots(np.arange(1, self.features + 1, dtype=np.float64), self.period)
        return [int(round(m)) - 1 for m in marks.ravel()]

    def to_dict(self) -> dict:
        return {"features": self.features, "im2col": self.im2col.to_dict() if self.im2col else None}

    @classmethod
    def from_dict(cls, d: dict) -> "InputEncoding":
        try:
            geometry = d.get("im2col")
            return cls(int(d["features"]), Im2colGeometry.from_dict(geometry) if geometry else None)
        except (AttributeError, KeyError, TypeError) as e:
            raise ValueError(f"malformed input encoding: {e}") from None


class HENet:
    """Single-query encrypted network: affine -> x^2 -> ... -> affine.

    ``first_conv`` (geometry, kernel, bias) makes the first layer a
    client-side-im2col convolution (:mod:`securecollab.he.conv`) instead of a
    dense diagonal product; ``layers[0]`` is then that convolution's matrix.
    """

    def __init__(self, layers: list[tuple[np.ndarray, np.ndarray]],
                 first_conv: tuple[Im2colGeometry, np.ndarray, np.ndarray | None] | None = None):
        self.layers = layers
        self.first_conv = first_conv
        self.plans = [DiagonalPlan(*w.shape) for w, _ in layers]
        self._compiled: list | None = None
        self.kit: SealKit | None = None

    @classmethod
    def from_torch(cls, model: nn.Module, input_shape: tuple[int, ...], slot_count: int = 4096) -> "HENet":
        """Lower ``model``; a leading Conv2d -> Square goes by im2col (:meth:`Im2colGeometry.fitted`): in one
        ciphertext when its layout fits ``slot_count``, or when the server can make the channels' copies by
        rotations; else in groups of kernel elements (several ciphertexts)."""
        from securecollab.models import Square

        layers = affine_layers(model, input_shape)
        modules = list(model)
        first_conv = None
        if (len(modules) > 1 and isinstance(modules[0], nn.Conv2d) and isinstance(modules[1], Square)
                and len(input_shape) == 3):
            geometry = Im2colGeometry.of(modules[0], input_shape).fitted(slot_count)
            if geometry is not None:
                conv = modules[0]
                bias = conv.bias.detach().double().numpy() if conv.bias is not None else None
                first_conv = (geometry, conv.weight.detach().double().numpy(), bias)
        return cls(layers, first_conv)

    @property
    def in_features(self) -> int:
        return self.plans[0].in_features

    @property
    def input_encoding(self) -> InputEncoding:
        return InputEncoding(self.in_features, self.first_conv[0] if self.first_conv else None)

    @property
    def depth(self) -> int:
        """Rescales needed: one per linear layer and one per square."""
        return 2 * len(self.layers) - 1

    @property
    def galois_steps(self) -> list[int]:
        steps = set(self.first_conv[0].galois_steps()) if self.first_conv else set(self.plans[0].galois_steps())
        return sorted(steps.union(*(plan.galois_steps() for plan in self.plans[1:])))

    @property
    def min_slots(self) -> int:
        lengths = [plan.length for plan in self.plans[1 if self.first_conv else 0:]]
        return max(lengths + ([self.first_conv[0].period] if self.first_conv else []))

    def bind(self, ctx) -> "HENet":
        """Encode every weight diagonal and bias once for this (server) context."""
        kit = kit_of(ctx)
        check_galois_keys(kit, self.galois_steps)
        if len(kit.level_parms()) <= self.depth:
            raise ValueError(f"the context allows fewer than the {self.depth} rescales this model needs")
        primes = kit.level_primes()
        compiled, level, scale = [], 0, kit.scale
        for i, (w, b) in enumerate(self.layers):
            if i == 0 and self.first_conv:
                compiled.append(Im2colConv(kit, *self.first_conv, in_scale=scale))
            else:
                compiled.append(EncryptedLinear(kit, w, b, level=level, in_scale=scale))
            level += 1
            if i < len(self.layers) - 1:
                scale = scale * scale / primes[level]  # the square's rescale
                level += 1
        self.kit, self._compiled = kit, compiled
        return self

    def evaluate(self, cts: list[sealapi.Ciphertext]) -> sealapi.Ciphertext:
        """Encrypted logits (slots 0..n_classes-1, repeated) from an encrypted input (its ciphertexts)."""
        if self._compiled is None:
            raise RuntimeError("call bind(context) before evaluate")
        if len(cts) != self.input_encoding.ciphertexts:
            raise ValueError(f"an input takes {self.input_encoding.ciphertexts} ciphertext(s), got {len(cts)}")
        ct = cts if self.first_conv else cts[0]
        for i, layer in enumerate(self._compiled):
            ct = layer(ct)
            if i < len(self._compiled) - 1:
                square_in_place(self.kit, ct)
        return ct

    def evaluate_bytes(self, data: list[bytes]) -> bytes:
        """Wire form of :meth:`evaluate`: SEAL ciphertext bytes in and out."""
        return self.kit.ciphertext_bytes(self.evaluate([self.kit.load_fresh(d) for d in data]))


def encrypt_input(ctx, x: np.ndarray, encoding: InputEncoding | None = None) -> list[sealapi.Ciphertext]:
    """Client side: one input in :class:`HENet`'s layout (default: flattened and repeated), as its ciphertexts."""
    kit = kit_of(ctx)
    return [kit.encrypt(row) for row in (encoding or InputEncoding(np.asarray(x).size)).slots(x, kit.slot_count)]


def encrypt_input_bytes(ctx, x: np.ndarray, encoding: InputEncoding | None = None) -> list[bytes]:
    """Wire form of :func:`encrypt_input`; seeded symmetric encryption halves it."""
    kit = kit_of(ctx)
    return [kit.encrypt_bytes(row) for row in
            (encoding or InputEncoding(np.asarray(x).size)).slots(x, kit.slot_count)]


def decrypt_logits(ctx, ct: sealapi.Ciphertext, n_classes: int) -> np.ndarray:
    """Client side: the first ``n_classes`` slots of an encrypted result."""
    return kit_of(ctx).decrypt(ct)[:n_classes]
