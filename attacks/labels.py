"""Label recovery from the last layer's bias gradient (iDLG for one image, counts for an aggregate).

Under softmax cross-entropy the gradient of the last bias for one example is
``softmax(z) - onehot(y)``: every entry is positive except the true label's.
Averaged over N examples it is ``mean_j p_j - counts / N``, so with an
estimate of the mean predicted distribution the adversary can solve for how
many examples carry each label. Only the model and the observed gradient
(and, optionally, auxiliary images to estimate predictions) are needed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from attacks.observed import NamedArrays, as_dict


def last_linear_bias(model: nn.Module) -> str:
    """Parameter name of the classifier's bias (the last ``nn.Linear`` in the model)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names or model.get_submodule(names[-1]).bias is None:
        raise ValueError("label recovery needs a last nn.Linear layer with a bias")
    return f"{names[-1]}.bias"


def infer_label(gradient: NamedArrays, model: nn.Module) -> int:
    """The label of a single example: the one entry of the last bias gradient that is negative."""
    bias_grad = as_dict(gradient)[last_linear_bias(model)]
    return int(np.argmin(bias_grad))


@torch.no_grad()
def expected_probabilities(model: nn.Module, auxiliary_images: np.ndarray) -> np.ndarray:
    """Mean softmax output of ``model`` (already holding the global weights) over the attacker's own images."""
    model.eval()
    return torch.softmax(model(torch.as_tensor(auxiliary_images)), dim=1).mean(0).numpy().astype(np.float64)


def infer_label_counts(bias_grad: np.ndarray, num_images: int,
                       expected_probs: np.ndarray | None = None) -> np.ndarray:
    """How many of ``num_images`` examples carry each label, from the batch-mean last bias gradient.

    Solves ``g = p_mean - counts / N`` for the counts with ``p_mean`` taken as
    ``expected_probs`` (uniform if none), then rounds by largest remainder so
    that the counts are non-negative integers summing to N.
    """
    g = np.asarray(bias_grad, dtype=np.float64)
    p = np.full_like(g, 1.0 / len(g)) if expected_probs is None else np.asarray(expected_probs, np.float64)
    real = np.clip(num_images * (p - g), 0.0, None)
    if real.sum() > 0:
        real *= num_images / real.sum()
    counts = np.floor(real).astype(np.int64)
    for c in np.argsort(-(real - counts))[: num_images - counts.sum()]:
        counts[c] += 1
    return counts


def infer_labels(gradient: NamedArrays, model: nn.Module, num_images: int,
                 expected_probs: np.ndarray | None = None) -> np.ndarray:
    """The recovered label multiset, sorted (``gradient`` is the mean over the ``num_images`` examples)."""
    if num_images == 1:
        return np.array([infer_label(gradient, model)])
    bias_grad = as_dict(gradient)[last_linear_bias(model)]
    counts = infer_label_counts(bias_grad, num_images, expected_probs)
    return np.repeat(np.arange(len(counts)), counts)
