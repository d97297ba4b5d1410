"""A model's forward pass and argmax on secret shares (model-private inference, inside a CrypTen world).

Every compute party holds one additive share (Z_2^64, fixed point 2^16) of the owner's flat parameter vector
and of each query. The architecture is public (the plan); the weights and inputs are not. The forward pass
walks the plan's ``nn.Sequential`` layer by layer on ``MPCTensor``s: products take the dealer's Beaver triples,
ReLU a comparison. Only this party's share of the answer leaves here, re-randomised with a fresh sharing of
zero so that the answer shares say nothing about the shares this party held during the computation.

Two traps found while building this (see the unit tests):
* CrypTen's own decoder is off by one for some negative values: revealed outputs are decoded with
  ``sharing.decode_fixed``, never ``get_plain_text``.
* In a product of a value and a 0/1 comparison result, the value goes on the left: CrypTen keeps the left
  operand's encoder, and the comparison's is scale 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from securecollab.models import Square
from securecollab.secagg.crypten_compat import load_crypten

FRAC_BITS = 16  # the answer's fixed point: logits and the label index alike


@dataclass(frozen=True)
class ParamLayout:
    """The order, names and shapes of a model's parameters in its flat vector (the state_dict order)."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParamLayout:
        return cls(tuple((name, tuple(t.shape)) for name, t in model.state_dict().items()))

    @property
    def size(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.entries)

    def flatten(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([np.asarray(arrays[name], np.float64).ravel() for name, _ in self.entries])

    def slices(self, flat: np.ndarray):
        """(name, shape, the piece of ``flat`` it occupies) for each parameter."""
        if flat.size != self.size:
            raise ValueError(f"a parameter vector of {flat.size} elements; this architecture has {self.size}")
        offset = 0
        for name, shape in self.entries:
            k = int(np.prod(shape))
            yield name, shape, flat[offset:offset + k]
            offset += k


def shared_weights(layout: ParamLayout, flat_share: np.ndarray) -> dict:
    """This party's share of the flat vector as one MPCTensor per parameter (adopted as encoded: no messages)."""
    mpc = load_crypten().mpc.MPCTensor
    return {name: mpc.from_shares(torch.from_numpy(piece.astype(np.int64, copy=True)).view(shape))
            for name, shape, piece in layout.slices(flat_share)}


SUPPORTED = (nn.Flatten, nn.Linear, nn.Conv2d, nn.ReLU, Square, nn.AvgPool2d)


def check_supported(model: nn.Sequential) -> None:
    """Refuse, before any MPC, an architecture whose layers this forward pass cannot evaluate."""
    for layer in model:
        if not isinstance(layer, SUPPORTED):
            raise ValueError(f"{type(layer).__name__} is not evaluated in MPC (supported: "
                             f"{', '.join(t.__name__ for t in SUPPORTED)})")
        if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.dilation != (1, 1)):
            raise ValueError("only plain convolutions (groups 1, dilation 1) are evaluated in MPC")


def shared_forward(model: nn.Sequential, weights: dict, x):
    """The model on secret-shared inputs ``x`` (MPCTensor, batch first) with secret-shared ``weights``."""
    check_supported(model)
    h = x
    for i, layer in enumerate(model):
        if isinstance(layer, nn.Flatten):
            h = h.flatten(start_dim=1)
        elif isinstance(layer, nn.Linear):
            h = h.matmul(weights[f"{i}.weight"].t()) + weights[f"{i}.bias"]
        elif isinstance(layer, nn.Conv2d):
            h = h.conv2d(weights[f"{i}.weight"], stride=layer.stride, padding=layer.padding)
            h = h + weights[f"{i}.bias"].view(1, -1, 1, 1)
        elif isinstance(layer, nn.ReLU):
            h = h.relu()
        elif isinstance(layer, Square):
            h = h.square()
        elif isinstance(layer, nn.AvgPool2d):
            h = h.avg_pool2d(layer.kernel_size, stride=layer.stride, padding=layer.padding)
    return h


def argmax_index(x):
    """Shares of each row's argmax (B, C) -> (B,), at scale 2^16; on ties the first maximum wins (numpy's rule).

    A tournament over adjacent pairs that carries the index beside the value: one comparison and one
    product round per level, log2(C) levels. Adjacent pairs keep the index order, which the tie rule needs."""
    crypten = load_crypten()
    rows, classes = x.size(0), x.size(1)
    vals = x
    # public indices as a sharing: a sharing of zero plus party 0's public value, no messages
    ids = crypten.cryptensor(torch.arange(classes, dtype=torch.float).expand(rows, -1).contiguous())
    while vals.size(1) > 1:
        h = vals.size(1) // 2
        a, b = vals[:, 0:2 * h:2], vals[:, 1:2 * h:2]
        ia, ib = ids[:, 0:2 * h:2], ids[:, 1:2 * h:2]
        ge = a >= b
        both = crypten.stack([a - b, ia - ib]) * ge.unsqueeze(0)  # value first: keeps the 2^16 encoder
        nv, ni = b + both[0], ib + both[1]
        if vals.size(1) % 2:
            nv, ni = crypten.cat([nv, vals[:, -1:]], dim=1), crypten.cat([ni, ids[:, -1:]], dim=1)
        vals, ids = nv, ni
    return ids.squeeze(1)


def rerandomise(t):
    """``t`` plus a fresh sharing of zero (from the parties' pairwise generators; no messages)."""
    primitives = load_crypten().mpc.primitives
    return t.share + primitives.ArithmeticSharedTensor.PRZS(t.share.size()).share


def answer(model: nn.Sequential, weights: dict, x_share: np.ndarray, input_shape: tuple[int, ...],
           output: str) -> np.ndarray:
    """This party's int64 share of the answer to one query: logits (B, C), or labels (B,) at scale 2^16.

    ``x_share``: this party's share of the query, flat int64 of B * prod(input_shape) elements."""
    mpc = load_crypten().mpc.MPCTensor
    per = int(np.prod(input_shape))
    if x_share.dtype != np.int64 or x_share.ndim != 1 or x_share.size % per:
        raise ValueError(f"a query share is a flat int64 vector of whole inputs of {per} elements")
    x = mpc.from_shares(torch.from_numpy(x_share.copy()).view(x_share.size // per, *input_shape))
    with torch.no_grad():
        logits = shared_forward(model, weights, x)
        out = logits if output == "logits" else argmax_index(logits)
        return rerandomise(out).numpy()
