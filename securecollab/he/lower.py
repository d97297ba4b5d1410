"""Lower a polynomial torch network to the affine maps an HE server evaluates.

Between two squares a network is affine, whatever mix of ``Conv2d``,
``AvgPool2d``, ``Flatten`` and ``Linear`` it uses, so each such run is folded
into one dense ``(W, b)`` on the flattened input: one rescale per run, not
per module. A convolution lowers to its im2col (Toeplitz) matrix -- row
``(c, y, x)`` holds the kernel of channel ``c`` at the pixels of window
``(y, x)`` -- which the diagonal and block layouts of :mod:`securecollab.he.net`
then multiply without ever materialising the zero entries on ciphertexts
(zero diagonals and zero blocks are skipped).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

LINEAR_MODULES = (nn.Conv2d, nn.AvgPool2d, nn.Flatten, nn.Linear, nn.Identity)


def conv_matrix(conv: nn.Conv2d, in_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(W, b, out_shape) with ``W @ x.ravel() + b == conv(x).ravel()`` (im2col lowering)."""
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"only plain zero-padded convolutions lower to a matrix, got {conv!r}")
    c_in, h, w = in_shape
    # Pixel index of every (kernel element, window): unfold an image of indices; -1 marks padding.
    index = torch.arange(c_in * h * w, dtype=torch.float64).reshape(1, c_in, h, w) + 1
    cols = F.unfold(index, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                    stride=conv.stride)[0].long() - 1                  # (c_in*kh*kw, windows)
    kernel = conv.weight.detach().double().reshape(conv.out_channels, -1).numpy()  # (c_out, c_in*kh*kw)
    windows = cols.shape[1]
    out_h = (h + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1
    out_w = windows // out_h
    weight = np.zeros((conv.out_channels, windows, c_in * h * w))
    cols = cols.numpy()
    for k, pixels in enumerate(cols):          # one kernel element at a time, all windows at once
        inside = pixels >= 0
        weight[:, np.flatnonzero(inside), pixels[inside]] = kernel[:, k][:, None]
    bias = np.zeros(conv.out_channels) if conv.bias is None else conv.bias.detach().double().numpy()
    return (weight.reshape(conv.out_channels * windows, -1), np.repeat(bias, windows),
            (conv.out_channels, out_h, out_w))


def module_matrix(module: nn.Module, in_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(W, b, out_shape) of one linear module acting on a flattened input of ``in_shape``."""
    n = math.prod(in_shape)
    if isinstance(module, nn.Conv2d):
        return conv_matrix(module, in_shape)
    if isinstance(module, nn.Linear):
        if n != module.in_features:
            raise ValueError(f"{module!r} expects {module.in_features} features, gets {n}")
        bias = np.zeros(module.out_features) if module.bias is None else module.bias.detach().double().numpy()
        return module.weight.detach().double().numpy(), bias, (module.out_features,)
    if isinstance(module, (nn.AvgPool2d, nn.Flatten, nn.Identity)):
        # Parameter-free and linear: the images of the unit vectors are the matrix's columns.
        with torch.no_grad():
            basis = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
            images = module(basis).reshape(n, -1)
        out_shape = tuple(module(basis[:1]).shape[1:])
        return images.T.numpy().copy(), np.zeros(images.shape[1]), out_shape
    raise ValueError(f"{type(module).__name__} is not linear; HE evaluation supports "
                     f"{', '.join(m.__name__ for m in LINEAR_MODULES)} and Square")


def affine_layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The model as affine maps separated by squares: ``[(W1, b1), (W2, b2), ...]``.

    The model must be a sequence of linear modules and ``Square`` activations
    that starts and ends with a linear module.
    """
    from securecollab.models import Square  # local import keeps he/ importable on its own

    shape = tuple(int(d) for d in input_shape)
    layers: list[tuple[np.ndarray, np.ndarray]] = []
    current: tuple[np.ndarray, np.ndarray] | None = None
    for module in model:
        if isinstance(module, Square):
            if current is None:
                raise ValueError("a Square must follow a linear layer")
            layers.append(current)
            current = None
            continue
        w, b, shape = module_matrix(module, shape)
        current = (w, b) if current is None else (w @ current[0], w @ current[1] + b)
    if current is None:
        raise ValueError("the model must end with a linear layer")
    layers.append(current)
    return layers
