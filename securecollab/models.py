"""Small torch models that can be cut into a bottom and a top half.

Every model is a :class:`CutSequential`: a plain ``nn.Sequential`` that also
names the places where it may be split for split learning. The ``square``
and ``poly`` activations keep the whole network polynomial, which is what
homomorphic-encryption friendly inference needs.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
from torch import nn

MODELS = ("mlp", "cnn", "convnet")
# Models without hidden layers (no activation, one cut only): kept out of MODELS, whose every
# entry has activations to swap and hidden layers to cut after. "linear" is the target of
# equation-solving model extraction (attacks.extraction): its logits are affine in the input.
SHALLOW_MODELS = ("linear",)
ACTIVATIONS = ("relu", "square", "poly")

MLP_HIDDEN = 64
CNN_FC_HIDDEN = 64
CONVNET_CHANNELS = 4


class Square(nn.Module):
    """x * x: the simplest HE-friendly nonlinearity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class Poly(nn.Module):
    """a * x^2 + b * x with fixed coefficients, a degree-2 stand-in for ReLU."""

    def __init__(self, a: float = 0.125, b: float = 0.5):
        super().__init__()
        self.a = a
        self.b = b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * x * x + self.b * x

    def extra_repr(self) -> str:
        return f"a={self.a}, b={self.b}"


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name."""
    if name == "relu":
        return nn.ReLU()
    if name == "square":
        return Square()
    if name == "poly":
        return Poly()
    raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")


class CutSequential(nn.Sequential):
    """A Sequential with named cut points.

    ``cut_points[name]`` is the index of the first layer of the top half,
    so the bottom half is ``self[:index]``.
    """

    cut_points: dict[str, int]
    default_cut: str


class MLP(CutSequential):
    """Flatten -> fc1 -> act -> fc2 -> act -> classifier."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, activation: str = "relu"):
        in_features = math.prod(input_shape)
        super().__init__(
            nn.Flatten(),
            nn.Linear(in_features, MLP_HIDDEN),
            make_activation(activation),
            nn.Linear(MLP_HIDDEN, MLP_HIDDEN // 2),
            make_activation(activation),
            nn.Linear(MLP_HIDDEN // 2, num_classes),
        )
        self.cut_points = {"after_fc1": 3, "after_fc2": 5}
        self.default_cut = "after_fc1"


class SmallCNN(CutSequential):
    """Two conv/act/avg-pool blocks, then a two-layer classifier.

    Average pooling (not max) keeps the network polynomial when the
    activation is polynomial.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, activation: str = "relu"):
        channels, height, width = input_shape
        if height < 4 or width < 4:
            raise ValueError(f"cnn needs images of at least 4x4 pixels, got {height}x{width}")
        # Two 2x2 pools, each flooring odd sizes.
        flat_features = 16 * (height // 4) * (width // 4)
        super().__init__(
            nn.Conv2d(channels, 8, 3, padding=1),
            make_activation(activation),
            nn.AvgPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            make_activation(activation),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(flat_features, CNN_FC_HIDDEN),
            make_activation(activation),
            nn.Linear(CNN_FC_HIDDEN, num_classes),
        )
        # Cuts sit after pooling/flattening so the bottom sends small tensors.
        self.cut_points = {"after_conv1": 3, "after_conv2": 7, "after_fc1": 9}
        self.default_cut = "after_conv2"


class ConvNet(CutSequential):
    """One convolution, then two fully connected layers: shallow enough for CKKS.

    The shape of TenSEAL's MNIST tutorial network (conv, act, fc, act, fc),
    sized to the image: 3x3 stride 1 for small images like the 8x8 digits,
    7x7 stride 3 from 16 pixels up. With square activations the whole
    network is a degree-4 polynomial needing 5 rescales (see securecollab.he).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, activation: str = "relu"):
        channels, height, width = input_shape
        kernel, stride = (3, 1) if min(height, width) < 16 else (7, 3)
        if min(height, width) < kernel:
            raise ValueError(f"convnet needs images of at least {kernel}x{kernel} pixels, got {height}x{width}")
        out_h, out_w = (height - kernel) // stride + 1, (width - kernel) // stride + 1
        super().__init__(
            nn.Conv2d(channels, CONVNET_CHANNELS, kernel, stride=stride),
            make_activation(activation),
            nn.Flatten(),
            nn.Linear(CONVNET_CHANNELS * out_h * out_w, CNN_FC_HIDDEN),
            make_activation(activation),
            nn.Linear(CNN_FC_HIDDEN, num_classes),
        )
        self.cut_points = {"after_conv": 3, "after_fc1": 5}
        self.default_cut = "after_conv"


class Linear(CutSequential):
    """Flatten -> one fully connected layer to the classes (multinomial logistic regression).

    ``activation`` is accepted for a uniform interface and ignored: there is
    nothing to activate. The only cut sends the flattened input itself.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, activation: str = "relu"):
        super().__init__(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
        self.cut_points = {"after_flatten": 1}
        self.default_cut = "after_flatten"


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    activation: str = "relu",
    seed: int | None = None,
) -> CutSequential:
    """Build a model by name; a seed gives a deterministic initialisation.

    The seed is applied inside a forked RNG so the caller's global torch
    random state is left untouched.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if name not in MODELS + SHALLOW_MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS + SHALLOW_MODELS)}")
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
        )
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if name in ("cnn", "convnet") and len(input_shape) != 3:
        raise ValueError(
            f"{name} needs image input shaped (C, H, W), got input shape {input_shape}; "
            "use 'mlp' for tabular data"
        )
    model_class = {"mlp": MLP, "cnn": SmallCNN, "convnet": ConvNet, "linear": Linear}[name]
    if seed is None:
        return model_class(input_shape, num_classes, activation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(input_shape, num_classes, activation)


def split_model(model: CutSequential, cut: str | None = None) -> tuple[nn.Sequential, nn.Sequential]:
    """Cut a model into (bottom, top) so that top(bottom(x)) == model(x).

    Both halves hold the very same layer modules as ``model``, so training
    either half trains the full model too. ``cut=None`` uses the default cut.
    """
    cut = model.default_cut if cut is None else cut
    if cut not in model.cut_points:
        raise ValueError(
            f"unknown cut {cut!r} for {type(model).__name__}; "
            f"choose one of {', '.join(model.cut_points)}"
        )
    index = model.cut_points[cut]
    # Build plain Sequentials: slicing a subclass would call its constructor.
    layers = list(model.children())
    return nn.Sequential(*layers[:index]), nn.Sequential(*layers[index:])


def parameters_to_arrays(model: nn.Module) -> list[tuple[str, np.ndarray]]:
    """The model state as (name, float32 array) pairs in state_dict order."""
    return [
        (name, tensor.detach().cpu().numpy().astype(np.float32, copy=True))
        for name, tensor in model.state_dict().items()
    ]


def load_arrays(model: nn.Module, named_arrays: Iterable[tuple[str, np.ndarray]]) -> None:
    """Load (name, array) pairs into ``model``, refusing anything that does not fit."""
    state = model.state_dict()
    incoming: dict[str, np.ndarray] = {}
    for name, array in named_arrays:
        if name in incoming:
            raise ValueError(f"parameter {name!r} given more than once")
        incoming[name] = array
    missing = [name for name in state if name not in incoming]
    unexpected = [name for name in incoming if name not in state]
    if missing or unexpected:
        raise ValueError(
            f"parameter names do not match the model: missing {missing}, unexpected {unexpected}"
        )
    for name, array in incoming.items():
        if not isinstance(array, np.ndarray):
            raise ValueError(f"parameter {name!r} must be a numpy array, got {type(array).__name__}")
        if array.dtype != np.float32:
            raise ValueError(f"parameter {name!r} must be float32, got {array.dtype}")
        expected = tuple(state[name].shape)
        if array.shape != expected:
            raise ValueError(
                f"parameter {name!r} has shape {array.shape}, expected {expected}"
            )
    # Copy so later changes to the arrays cannot reach into the model.
    model.load_state_dict({name: torch.tensor(array) for name, array in incoming.items()})


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalar parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class UpdateVector(torch.nn.Module):
    """Stands in for a model in aggregation benchmarks: one flat vector of parameters."""

    def __init__(self, length: int):
        super().__init__()
        self.update = torch.nn.Parameter(torch.zeros(length))
