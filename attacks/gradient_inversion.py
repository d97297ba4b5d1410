"""Optimization-based gradient inversion (attack ``gradient_inversion``), after Geiping et al. 2020.

The adversary knows the architecture, the global weights it sent, what it
observed (a client's new weights, or an aggregate of them revealed by secure
aggregation) and how the client trains (:class:`LocalTraining`). It does not
know the data. It searches for N dummy images (and labels) whose effect on the
model points the same way as the observation:

* objective: cosine distance between the dummy's parameter gradient (or
  simulated update) and the observed one — the cosine ignores the overall
  scale, so for one step the learning rate need not be known — plus a total-variation
  prior that favours piecewise-smooth images. Unlike the paper, which reads
  all layers as one vector, the default averages one cosine per parameter
  tensor: on the digits MLP the one-vector form left ~8% of single images in
  a wrong-ReLU-pattern local minimum (PSNR 11-20 dB), per-tensor none of 50;
* Adam on the pixels with step decay at 3/8, 5/8 and 7/8 of the run, pixels
  clamped to the valid range after every step, the best of a few random
  restarts (by final gradient distance, which the adversary can compute);
* labels: iDLG for one image (the one negative entry of the last bias
  gradient); label counts from the same gradient for N images; or soft labels
  optimized jointly when neither is trusted.

Two regimes for a FedAvg update after several local steps (``regime``):
``"gradient"`` treats ``global - new`` as a multiple of one gradient at the
global weights (exact for one step, i.e. FedSGD); ``"unroll"`` differentiates
through a simulation of the client's whole local training (its epochs, batch
order, learning rate and momentum) on the dummy data and matches the
simulated update to the observed one.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from attacks.knowledge import LocalTraining
from attacks.labels import expected_probabilities, infer_labels, last_linear_bias
from attacks.observed import NamedArrays, as_dict, gradient_from_update, parameter_delta
from securecollab.models import load_arrays

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class InversionConfig:
    """How hard the adversary searches, and the valid pixel range it assumes.

    Defaults measured on the digits MLP (one image, one step, 2-core CPU):
    ~0.5 s per image, median PSNR > 60 dB. ``iterations=100`` is ~3x faster
    and still clears 25 dB on almost every image.
    """

    iterations: int = 300
    step_size: float = 0.1
    tv_weight: float = 1e-4  # light: on 8x8 digits a strong TV prior costs more precision than it buys
    restarts: int = 1
    layerwise: float = 1.0  # see cosine_distance
    regime: Literal["gradient", "unroll"] = "unroll"  # only matters after more than one local step
    labels: Literal["infer", "soft"] = "infer"
    pixel_range: tuple[float, float] = (0.0, 1.0)
    seed: int = 0


@dataclass
class Inversion:
    """The adversary's guesses: N images (channels-first) and their labels, with what it cost."""

    images: np.ndarray
    labels: np.ndarray
    distance: float  # final cosine distance to the observation (lower is a better fit)
    iterations: int
    wall_s: float
    method: str = "optimization"  # or "hidden_span": separated layer by layer (attacks/separation.py)


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    dot = sum((x * y).sum() for x, y in zip(a, b))
    norm_a = torch.sqrt(sum((x * x).sum() for x in a))
    norm_b = torch.sqrt(sum((y * y).sum() for y in b))
    return dot / (norm_a * norm_b + 1e-12)


def cosine_distance(a: list[torch.Tensor], b: list[torch.Tensor], *, layerwise: float = 1.0) -> torch.Tensor:
    """1 - cos(a, b) between two lists of parameter-shaped tensors.

    Two readings, mixed by ``layerwise`` in [0, 1]: the mean of one distance
    per tensor pair (weight ``layerwise``), which lets the small deep layers —
    whose gradients pin down which ReLUs are active — weigh as much as the
    large first layer; and the lists read as one long vector, as in Geiping
    et al. (weight ``1 - layerwise``).
    """
    whole = 1.0 - _cosine(a, b) if layerwise < 1.0 else 0.0
    per_tensor = sum(1.0 - _cosine([x], [y]) for x, y in zip(a, b)) / len(a) if layerwise > 0.0 else 0.0
    return layerwise * per_tensor + (1.0 - layerwise) * whole


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (anisotropic TV)."""
    dh = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    dw = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    return dh + dw


def leaf_params(model: nn.Module, global_params: NamedArrays) -> dict[str, torch.Tensor]:
    """The global weights as leaf tensors that gradients can be taken with respect to."""
    g = as_dict(global_params)
    names = [name for name, _ in model.named_parameters()]
    if set(names) != set(g):
        raise ValueError(f"global parameters do not match the model: {sorted(set(names) ^ set(g))}")
    return {name: torch.tensor(g[name]).requires_grad_(True) for name in names}


def gradient_objective(model: nn.Module, params: dict[str, torch.Tensor],
                       observed_gradient: dict[str, np.ndarray], *, layerwise: float = 1.0) -> Objective:
    """Distance between the dummy batch's mean-loss gradient at the global weights and the observed gradient."""
    observed = [torch.as_tensor(observed_gradient[name], dtype=torch.float32) for name in params]

    def objective(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(functional_call(model, params, (images,)), targets)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        return cosine_distance(list(grads), observed, layerwise=layerwise)

    return objective


def simulate_update(model: nn.Module, params: dict[str, torch.Tensor], images: torch.Tensor,
                    targets: torch.Tensor, training: LocalTraining) -> dict[str, torch.Tensor]:
    """``new - global`` after the client's local SGD on (images, targets), differentiable in both.

    Follows torch.optim.SGD: the momentum buffer starts as the first
    gradient, then ``buf = m * buf + grad``; ``w -= lr * buf``.
    """
    # the starting weights must be leaves autograd can differentiate with respect to
    params = {name: p if p.requires_grad else p.detach().requires_grad_(True) for name, p in params.items()}
    current, buffers = dict(params), {}
    for epoch in range(training.epochs):
        for idx in training.batches(len(images), epoch):
            idx = torch.as_tensor(idx)
            loss = F.cross_entropy(functional_call(model, current, (images[idx],)), targets[idx])
            grads = torch.autograd.grad(loss, list(current.values()), create_graph=True)
            for (name, weight), grad in zip(list(current.items()), grads):
                step = grad if name not in buffers or not training.momentum else \
                    training.momentum * buffers[name] + grad
                buffers[name] = step
                current[name] = weight - training.lr * step
    return {name: current[name] - params[name] for name in params}


def unroll_objective(model: nn.Module, params: dict[str, torch.Tensor], observed_delta: dict[str, np.ndarray],
                     training: LocalTraining, *, layerwise: float = 1.0) -> Objective:
    """Distance between the update simulated on the dummy data and the observed update."""
    observed = [torch.as_tensor(observed_delta[name], dtype=torch.float32) for name in params]

    def objective(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        delta = simulate_update(model, params, images, targets, training)
        return cosine_distance([delta[name] for name in params], observed, layerwise=layerwise)

    return objective


def _one_trial(objective: Objective, images: torch.Tensor, label_logits: torch.Tensor,
               fixed: torch.Tensor | None, config: InversionConfig) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Adam from one starting point; returns (final distance, images, labels)."""
    lo, hi = config.pixel_range
    images.requires_grad_(True)
    label_logits.requires_grad_(fixed is None)
    optimizer = torch.optim.Adam([images] + ([label_logits] if fixed is None else []), lr=config.step_size)
    milestones = [int(config.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)

    def targets() -> torch.Tensor:
        return fixed if fixed is not None else torch.softmax(label_logits, dim=1)

    for _ in range(config.iterations):
        optimizer.zero_grad()
        loss = objective(images, targets()) + config.tv_weight * total_variation(images)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            images.clamp_(lo, hi)  # box constraint: valid pixels only
    distance = float(objective(images, targets()).detach())
    guessed = fixed if fixed is not None else label_logits.detach().argmax(1)
    return distance, images.detach().clone(), guessed.clone()


def optimize_dummies(objective: Objective, num_images: int, input_shape: tuple[int, ...], num_classes: int,
                     labels: np.ndarray | None, config: InversionConfig, init: np.ndarray | None = None) -> Inversion:
    """Search N dummy images (and soft labels when ``labels`` is None) minimising ``objective`` + TV.

    Of several restarts the one with the smallest final distance wins: the
    adversary can compute that distance, it needs no ground truth. ``init``
    (up to N images) starts one extra trial; the rest of its dummies are random.
    """
    start = time.perf_counter()
    lo, hi = config.pixel_range
    generator = torch.Generator().manual_seed(config.seed)
    fixed = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    trials = []
    for _ in range(max(1, config.restarts)):
        images = lo + (hi - lo) * torch.rand((num_images, *input_shape), generator=generator)
        label_logits = torch.randn((num_images, num_classes), generator=generator)
        trials.append(_one_trial(objective, images, label_logits, fixed, config))
    if init is not None and len(init):
        images = lo + (hi - lo) * torch.rand((num_images, *input_shape), generator=generator)
        images[:len(init)] = torch.as_tensor(np.asarray(init, np.float32)).reshape(len(init), *input_shape)
        label_logits = torch.randn((num_images, num_classes), generator=generator)
        trials.append(_one_trial(objective, images, label_logits, fixed, config))
    distance, images, guessed = min(trials, key=lambda trial: trial[0])
    return Inversion(images=images.numpy().astype(np.float32), labels=guessed.numpy().astype(np.int64),
                     distance=distance, iterations=config.iterations * len(trials),
                     wall_s=time.perf_counter() - start)


def labels_for(model: nn.Module, global_params: NamedArrays, gradient: dict[str, np.ndarray],
                num_images: int, labels, auxiliary_images, config: InversionConfig) -> np.ndarray | None:
    """Hard labels to fix during the search, or None to optimize soft labels alongside the images."""
    if labels is not None:  # declared knowledge (or an oracle, for ablations)
        return np.asarray(labels, dtype=np.int64)
    if config.labels == "soft":
        return None
    try:
        last_linear_bias(model)
    except ValueError:
        return None  # no classifier bias to read labels from: fall back to soft labels
    probs = None
    if auxiliary_images is not None and num_images > 1:
        reference = copy.deepcopy(model)  # leave the caller's model untouched
        load_arrays(reference, list(as_dict(global_params).items()))
        probs = expected_probabilities(reference, auxiliary_images)
    return infer_labels(gradient, model, num_images, probs)


def _labels_in_init_order(model: nn.Module, global_params: NamedArrays, init: np.ndarray,
                          labels: np.ndarray) -> np.ndarray:
    """Reorder a label multiset so the first len(init) labels are the ones the global model finds likeliest
    for the starting images (Hungarian assignment); the rest follow in any order."""
    from scipy.optimize import linear_sum_assignment
    reference = copy.deepcopy(model)
    load_arrays(reference, list(as_dict(global_params).items()))
    reference.eval()
    with torch.no_grad():
        logp = torch.log_softmax(reference(torch.as_tensor(np.asarray(init, np.float32))), dim=1).numpy()
    rows, cols = linear_sum_assignment(-logp[:, labels])  # rows: init images, cols: positions in labels
    first = [labels[c] for _, c in sorted(zip(rows, cols))]
    rest = np.delete(labels, cols)
    return np.concatenate([np.array(first, dtype=np.int64), rest]).astype(np.int64)


def invert_gradient(model: nn.Module, global_params: NamedArrays, gradient: NamedArrays, num_images: int,
                    input_shape: tuple[int, ...], num_classes: int, *, labels=None, auxiliary_images=None,
                    config: InversionConfig = InversionConfig()) -> Inversion:
    """Reconstruct the ``num_images`` examples whose mean-loss gradient at ``global_params`` is ``gradient``.

    ``model`` only supplies the architecture (its own weights are not used).
    ``auxiliary_images`` (the attacker's own data) sharpen label counting for N > 1.
    """
    grad = as_dict(gradient)
    params = leaf_params(model, global_params)
    chosen = labels_for(model, global_params, grad, num_images, labels, auxiliary_images, config)
    objective = gradient_objective(model, params, grad, layerwise=config.layerwise)
    return optimize_dummies(objective, num_images, input_shape, num_classes, chosen, config)


def invert_update(model: nn.Module, global_params: NamedArrays, new_params: NamedArrays, num_images: int,
                  input_shape: tuple[int, ...], num_classes: int, training: LocalTraining, *, labels=None,
                  auxiliary_images=None, config: InversionConfig = InversionConfig(),
                  init: np.ndarray | None = None) -> Inversion:
    """Reconstruct a client's ``num_images`` examples from its new weights (or an aggregate of such).

    A secure-aggregation aggregate of N single-example, one-step updates is
    the same as one client's one step on those N examples: pass N and a
    full-batch, one-epoch ``training``. Unless given, labels are inferred
    from the gradient the update implies (:func:`gradient_from_update`) or,
    with ``config.labels == "soft"``, optimized; the images follow
    ``config.regime``.
    """
    implied = gradient_from_update(global_params, new_params, training, num_images)
    chosen = labels_for(model, global_params, implied, num_images, labels, auxiliary_images, config)
    params = leaf_params(model, global_params)
    if config.regime == "gradient" or training.num_steps(num_images) == 1:
        objective = gradient_objective(model, params, implied, layerwise=config.layerwise)
    elif config.regime == "unroll":
        objective = unroll_objective(model, params, parameter_delta(global_params, new_params), training,
                                     layerwise=config.layerwise)
    else:
        raise ValueError(f"unknown regime {config.regime!r}")
    if init is not None and len(init) and chosen is not None:
        chosen = _labels_in_init_order(model, global_params, np.asarray(init)[:num_images], chosen)
    return optimize_dummies(objective, num_images, input_shape, num_classes, chosen, config, init=init)
