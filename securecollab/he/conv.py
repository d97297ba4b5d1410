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
256 outputs against 4096 slots) there are two ways out:

* ``rotated_channels``, when the outputs fill their block exactly (channels x
  windows a power of two, as 4 x 64 for 28x28): the client sends the patches
  once, not once per channel (``kpad * windows`` slots, one ciphertext), and
  the server makes the channels' copies itself with ``channels - 1``
  rotations by whole windows. Copy ``d`` (shifted by ``d`` blocks of
  ``windows``) is multiplied by weights that give block ``m`` channel ``m mod
  channels``' weight of the kernel element now there, so each (channel,
  element) product lands once in a block of its channel; the rotate-and-adds
  by ``block`` then sum them.
* otherwise ``group``: kernel elements in groups of ``group`` blocks, one
  ciphertext per group; the server adds the groups' products (a sum across
  ciphertexts, no rotation) before the same rotate-and-adds.

Either way one product level and a few rotations, where the dense fallback
needs a diagonal method over a 784 x 256 matrix.
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


MAX_CIPHERTEXTS = 64  # per input: a described layout asking a client for more is refused


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
    rotated_channels: bool = False  # patches sent once, the channels' copies made by the server's rotations

    @classmethod
    def of(cls, conv: nn.Conv2d, in_shape) -> "Im2colGeometry":
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"only plain zero-padded convolutions have an im2col layout, got {conv!r}")
        return cls(tuple(int(d) for d in in_shape), conv.out_channels, tuple(conv.kernel_size),
                   tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation))

    @classmethod
    def from_dict(cls, d: dict) -> "Im2colGeometry":
        """A geometry described by the server; refused (ValueError) unless it is one a client can lay out."""
        def fail(why: str):
            raise ValueError(f"malformed im2col geometry: {why}")

        try:
            sizes = {k: tuple(int(v) for v in d[k]) for k in ("in_shape", "kernel", "stride", "padding", "dilation")}
            out_channels, group = int(d["out_channels"]), int(d.get("group", 0))
            rotated = d.get("rotated_channels", False)
        except (KeyError, TypeError, ValueError) as e:
            fail(str(e))
        if len(sizes["in_shape"]) != 3 or any(len(sizes[k]) != 2 for k in ("kernel", "stride", "padding", "dilation")):
            fail("in_shape takes 3 sizes, kernel, stride, padding and dilation 2 each")
        if min(*sizes["in_shape"], *sizes["kernel"], *sizes["stride"], *sizes["dilation"], out_channels) < 1 \
                or min(sizes["padding"]) < 0:
            fail("sizes must be positive (padding at least 0)")
        if not isinstance(rotated, bool):
            fail(f"rotated_channels must be true or false, got {rotated!r}")
        if group < 0 or group & (group - 1):
            fail(f"group {group} is not a power of two")
        geometry = cls(**sizes, out_channels=out_channels, group=group, rotated_channels=rotated)
        if min(geometry.out_hw) < 1:
            fail(f"a {geometry.kernel} kernel does not fit a {geometry.in_shape} input")
        if rotated and (group or not geometry._channels_rotate()):
            fail("these channels cannot be made by rotations")
        if geometry.ciphertexts > MAX_CIPHERTEXTS:
            fail(f"{geometry.ciphertexts} ciphertexts per input (at most {MAX_CIPHERTEXTS})")
        return geometry

    def _channels_rotate(self) -> bool:
        return self.out_features == self.block and self.kpad % self.out_channels == 0

    def fitted(self, slot_count: int) -> "Im2colGeometry | None":
        """This layout in ``slot_count`` slots: one ciphertext if a period fits; else one ciphertext with the
        channels made by rotations, if they can be; else groups of kernel elements (one ciphertext each);
        None if not even one block of outputs fits."""
        if slot_count % (self.kpad * self.block) == 0:
            return replace(self, group=0, rotated_channels=False)
        if self._channels_rotate() and slot_count % (self.kpad * self.windows) == 0:
            return replace(self, group=0, rotated_channels=True)
        if slot_count % self.block == 0:
            return replace(self, group=slot_count // self.block, rotated_channels=False)
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
        return self.kpad * self.windows if self.rotated_channels else self.per_ciphertext * self.block

    def sum_steps(self) -> list[int]:
        """The rotate-and-adds that sum a ciphertext's blocks of one output channel."""
        summed = self.kpad // self.out_channels if self.rotated_channels else self.per_ciphertext
        return [self.block << i for i in range(summed.bit_length() - 1)]

    def terms(self) -> list[tuple[int, int]]:
        """(input ciphertext, left rotation) for each weight plaintext: the products the server adds."""
        if self.rotated_channels:  # copy d: the patches d windows-blocks to the left (steps the dense layers share)
            return [(0, d * self.windows) for d in range(self.out_channels)]
        return [(i, 0) for i in range(self.ciphertexts)]

    def galois_steps(self) -> list[int]:
        return sorted(set(self.sum_steps()) | {step for _, step in self.terms() if step})

    def _tile(self, per_element: np.ndarray, rows: int, width: int, slot_count: int) -> np.ndarray:
        """(kernel_elements, values) -> (rows, slot_count): one block of ``width`` slots per kernel element,
        ``period`` slots of blocks per row, each row repeated to fill the slots."""
        if slot_count % self.period:
            raise ValueError(f"the im2col layout needs a multiple of {self.period} slots, have {slot_count}")
        cube = np.zeros((rows * self.period // width, width))
        cube[:len(per_element), :per_element.shape[1]] = per_element
        return np.tile(cube.reshape(rows, self.period), (1, slot_count // self.period))

    def input_slots(self, x: np.ndarray, slot_count: int) -> np.ndarray:
        """Client side: the image's patches, one block per kernel element, repeated per channel
        (one row per ciphertext)."""
        x = np.asarray(x, dtype=np.float64)
        if x.size != math.prod(self.in_shape):
            raise ValueError(f"expected an input of shape {self.in_shape}, got {x.shape}")
        patches = F.unfold(torch.from_numpy(x.reshape(1, *self.in_shape)), self.kernel, dilation=self.dilation,
                           padding=self.padding, stride=self.stride)[0].numpy()   # (K, windows)
        if self.rotated_channels:  # once; the server makes the channels' copies
            return self._tile(patches, 1, self.windows, slot_count)
        return self._tile(np.tile(patches, self.out_channels), self.ciphertexts, self.block, slot_count)

    def weight_slots(self, kernel: np.ndarray, slot_count: int) -> np.ndarray:
        """Server side: w[c, k] at every window of channel c in block k; with rotated channels, one row per
        copy d of the patches: block m holds channel (m mod channels)' weight of element m + d."""
        w = np.asarray(kernel, dtype=np.float64).reshape(self.out_channels, self.kernel_elements)
        if not self.rotated_channels:
            return self._tile(np.repeat(w.T, self.windows, axis=1), self.ciphertexts, self.block, slot_count)
        blocks = np.arange(self.kpad)
        rows = []
        for d in range(self.out_channels):
            element = (blocks + d) % self.kpad
            per_block = np.where(element < self.kernel_elements,
                                 w[blocks % self.out_channels, np.minimum(element, self.kernel_elements - 1)], 0.0)
            rows.append(self._tile(np.repeat(per_block[:, None], self.windows, axis=1), 1, self.windows, slot_count))
        return np.concatenate(rows)


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

    def __call__(self, cts: list[sealapi.Ciphertext]) -> sealapi.Ciphertext:
        ev, keys = self.kit.evaluator, self.kit.galois_keys
        if len(cts) != self.geometry.ciphertexts:
            raise ValueError(f"this convolution takes {self.geometry.ciphertexts} input ciphertexts, got {len(cts)}")
        out, product, rotated = sealapi.Ciphertext(), sealapi.Ciphertext(), sealapi.Ciphertext()
        for i, ((index, step), weights) in enumerate(zip(self.geometry.terms(), self.weights)):
            source = cts[index]
            if step:  # a channel's copy of the patches
                ev.rotate_vector(source, step, keys, rotated)
                source = rotated
            ev.multiply_plain(source, weights, out if i == 0 else product)
            if i:  # the groups' (or copies') products add up without rotations
                ev.add_inplace(out, product)
        ev.rescale_to_next_inplace(out)  # rotations are cheaper one prime down
        shifted = sealapi.Ciphertext()
        for step in self.geometry.sum_steps():
            ev.rotate_vector(out, step, keys, shifted)
            ev.add_inplace(out, shifted)
        if self.bias is not None:
            ev.add_plain_inplace(out, self.bias)
        return out
