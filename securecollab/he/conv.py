"""A network's first convolution on one encrypted image, by client-side im2col.

The client, who holds the image in the clear, unfolds it into patches before
encrypting (im2col): slot ``k*block + c*windows + j`` holds pixel ``k`` of
window ``j``, repeated for every output channel ``c``, with ``kernel
elements`` padded to a power of two ``kpad`` and ``block =
next_pow2(channels * windows)``. The server multiplies by one plaintext
holding ``w[c, k]`` at the same slots, rescales, and sums the ``kpad`` blocks
with ``log2(kpad)`` rotate-and-adds. Every block then holds the whole
convolution output, i.e. the output is repeated with period ``block``:
exactly the layout the following diagonal layer reads
(:mod:`securecollab.he.linear`). One plaintext product and four rotations
replace the 64 products and 14 rotations of the dense diagonal method for
the 8x8 digits network. The geometry (not the weights) is public: the
server sends it to the client in the model description.

When ``kpad * block`` exceeds the slots (28x28 images: 64 kernel elements x
256 outputs against 4096 slots) the kernel elements are split into groups of
``group`` blocks, one ciphertext per group. The server multiplies each by its
own weights and adds the products -- a sum across ciphertexts, without
rotations -- before the same rotate-and-adds within one ciphertext: more
bytes up (one ciphertext per group) but still a single product level and
``log2(group)`` rotations, where the dense fallback needed a diagonal method
over a 784 x 256 matrix.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from tenseal import sealapi
from torch import nn
from torch.nn import functional as F

from securecollab.he.linear import next_pow2
from securecollab.he.seal import SealKit


@dataclass(frozen=True)
class Im2colGeometry:
    """Shapes of a zero-padded, ungrouped Conv2d on one ``in_shape`` image."""

    in_shape: tuple[int, int, int]
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    group: int = 0  # kernel elements per ciphertext, a power of two (0: all of them, kpad, in one)

    @classmethod
    def of(cls, conv: nn.Conv2d, in_shape) -> "Im2colGeometry":
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"only plain zero-padded convolutions have an im2col layout, got {conv!r}")
        return cls(tuple(int(d) for d in in_shape), conv.out_channels, tuple(conv.kernel_size),
                   tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation))

    @classmethod
    def from_dict(cls, d: dict) -> "Im2colGeometry":
        try:
            geometry = cls(**{k: tuple(int(v) for v in d[k]) for k in ("in_shape", "kernel", "stride", "padding",
                                                                      "dilation")},
                           out_channels=int(d["out_channels"]), group=int(d.get("group", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed im2col geometry: {e}") from None
        if geometry.group < 0 or geometry.group & (geometry.group - 1):
            raise ValueError(f"malformed im2col geometry: group {geometry.group} is not a power of two")
        return geometry

    def fitted(self, slot_count: int) -> "Im2colGeometry | None":
        """This layout in ``slot_count`` slots: one ciphertext if a period fits, else groups of kernel elements
        (one ciphertext each); None if not even one block of outputs fits."""
        if slot_count % (self.kpad * self.block) == 0:
            return replace(self, group=0)
        if slot_count % self.block == 0:
            return replace(self, group=slot_count // self.block)
        return None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def out_hw(self) -> tuple[int, int]:
        return tuple((self.in_shape[1 + a] + 2 * self.padding[a] - self.dilation[a] * (self.kernel[a] - 1) - 1)
                     // self.stride[a] + 1 for a in (0, 1))

    @property
    def windows(self) -> int:
        return math.prod(self.out_hw)

    @property
    def kernel_elements(self) -> int:
        return self.in_shape[0] * self.kernel[0] * self.kernel[1]

    @property
    def out_features(self) -> int:
        return self.out_channels * self.windows

    @property
    def block(self) -> int:
        return next_pow2(self.out_features)

    @property
    def kpad(self) -> int:
        return next_pow2(self.kernel_elements)

    @property
    def per_ciphertext(self) -> int:
        """Kernel elements (blocks) one ciphertext holds."""
        return self.group or self.kpad

    @property
    def ciphertexts(self) -> int:
        return -(-self.kernel_elements // self.per_ciphertext)

    @property
    def period(self) -> int:
        """Slots one copy of the layout takes in each ciphertext; the slot count must be a multiple."""
        return self.per_ciphertext * self.block

    def galois_steps(self) -> list[int]:
        return [self.block << i for i in range(self.per_ciphertext.bit_length() - 1)]

    def _tile(self, per_element: np.ndarray, slot_count: int) -> np.ndarray:
        """(kernel_elements, out_features) values -> (ciphertexts, slot_count): each ciphertext's group of
        blocks, repeated to fill its slots."""
        if slot_count % self.period:
            raise ValueError(f"the im2col layout needs a multiple of {self.period} slots, have {slot_count}")
        cube = np.zeros((self.ciphertexts * self.per_ciphertext, self.block))
        cube[:self.kernel_elements, :self.out_features] = per_element
        return np.tile(cube.reshape(self.ciphertexts, self.period), (1, slot_count // self.period))

    def input_slots(self, x: np.ndarray, slot_count: int) -> np.ndarray:
        """Client side: the image's patches, one block per kernel element, repeated per channel
        (one row per ciphertext)."""
        x = np.asarray(x, dtype=np.float64)
        if x.size != math.prod(self.in_shape):
            raise ValueError(f"expected an input of shape {self.in_shape}, got {x.shape}")
        patches = F.unfold(torch.from_numpy(x.reshape(1, *self.in_shape)), self.kernel, dilation=self.dilation,
                           padding=self.padding, stride=self.stride)[0].numpy()   # (K, windows)
        return self._tile(np.tile(patches, self.out_channels), slot_count)

    def weight_slots(self, kernel: np.ndarray, slot_count: int) -> np.ndarray:
        """Server side: w[c, k] at every window of channel c in block k."""
        k = np.asarray(kernel, dtype=np.float64).reshape(self.out_channels, self.kernel_elements)
        return self._tile(np.repeat(k.T, self.windows, axis=1), slot_count)


class Im2colConv:
    """The first convolution of a single-query network, on an im2col-encoded ciphertext.

    Output: one level lower, same scale, repeated with period ``geometry.block``.
    """

    def __init__(self, kit: SealKit, geometry: Im2colGeometry, kernel: np.ndarray, bias: np.ndarray | None,
                 *, in_scale: float):
        self.kit, self.geometry = kit, geometry
        parms, primes = kit.level_parms(), kit.level_primes()
        self.weights = [kit.encode(row, parms[0], primes[0]) for row in geometry.weight_slots(kernel, kit.slot_count)]
        self.bias = None
        if bias is not None and np.any(bias):
            per_channel = np.repeat(np.asarray(bias, dtype=np.float64), geometry.windows)
            padded = np.zeros(geometry.block)
            padded[:len(per_channel)] = per_channel
            self.bias = kit.encode(np.tile(padded, kit.slot_count // geometry.block), parms[1], in_scale)

    @property
    def galois_steps(self) -> list[int]:
        return self.geometry.galois_steps()

    def __call__(self, cts: list[sealapi.Ciphertext]) -> sealapi.Ciphertext:
        ev, keys = self.kit.evaluator, self.kit.galois_keys
        if len(cts) != len(self.weights):
            raise ValueError(f"this convolution takes {len(self.weights)} input ciphertexts, got {len(cts)}")
        out, product = sealapi.Ciphertext(), sealapi.Ciphertext()
        ev.multiply_plain(cts[0], self.weights[0], out)
        for ct, weights in zip(cts[1:], self.weights[1:]):  # the groups' products add up without rotations
            ev.multiply_plain(ct, weights, product)
            ev.add_inplace(out, product)
        ev.rescale_to_next_inplace(out)  # rotations are cheaper one prime down
        shifted = sealapi.Ciphertext()
        for step in self.galois_steps:
            ev.rotate_vector(out, step, keys, shifted)
            ev.add_inplace(out, shifted)
        if self.bias is not None:
            ev.add_plain_inplace(out, self.bias)
        return out
