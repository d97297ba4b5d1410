"""Separating an aggregate of N examples' gradients into the N inputs (networks that start Linear -> ReLU -> Linear).

What one gradient step summed over N examples reveals, layer by layer (``h = relu(W1 x + b1)``):

* the first layer's weight update is ``sum_s g_s x_sᵀ``: its row space is exactly the span of the N
  inputs (rank N), and its bias update ``sum_s g_s`` fixes a vector z with ``x_s · z = 1`` for every s;
* the second layer's weight update is ``sum_s d_s h_sᵀ``: its row space is the span of the N hidden
  vectors. Each example has its own ReLU pattern, so the d_s differ and that span has rank N too.

So every input x_s is a point of the first span, on the hyperplane ``x · z = 1``, whose hidden vector
``relu(W1 x + b1)`` falls in the second span: N - 1 unknowns against (width - N) equations, met by the
true inputs and, generically, by little else (a mixture of two inputs misses on the units where only
one of them is active). A batch of starting points (the adversary's own images projected onto the span)
descends on the distance to the second span, all at once; the points that end nearest are candidates.
Then the step is explained as ``step_size * sum of N gradients``, one (candidate, label) pair each, with
the one step size the protocol used (a free weight per example would let mixtures stand in for missing
examples): greedy choice and swaps on the Gram matrix of every candidate's gradient with every label.
Chosen candidates on the search's noise floor are settled; what they do not explain is searched again
with fewer examples in it (a lower rank), which finds examples that no start reached the first time.
The last layer is not used: examples of one label share its error direction, so its span has less
than rank N. Needs N below both hidden widths; ``separate`` returns None where the model does not
begin with this structure, and the optimization (attacks/gradient_inversion.py) is left alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from attacks.gradient_inversion import Inversion
from attacks.observed import parameter_delta

START_POINTS = 1500
STEPS = 300
CANDIDATES_PER_EXAMPLE = 6  # the dictionary's size: at most this many distinct candidates per example
DUPLICATE = 0.03            # max |pixel difference| under which two candidates are one input
FLOOR_FACTOR = 30.0         # a candidate this close to the best one's hidden-span residual is an example
DEFLATIONS = 2              # searches again for examples the first search missed


@dataclass
class Separation:
    images: np.ndarray  # (found, *input_shape), found <= N
    labels: np.ndarray
    residual: float     # |observed step - fitted per-example steps| / |observed step|
    candidates: int     # distinct candidates the hidden-span search offered the fit


def relu_pair(model: nn.Module) -> tuple[str, str] | None:
    """The names of the first two linear layers if the model begins [Flatten ->] Linear -> ReLU -> Linear."""
    children = list(model.named_children())
    start = 1 if children and isinstance(children[0][1], nn.Flatten) else 0
    kinds = [type(m) for _, m in children[start:start + 3]]
    if kinds != [nn.Linear, nn.ReLU, nn.Linear]:
        return None
    return children[start][0], children[start + 2][0]


def _row_space(matrix: np.ndarray, rank: int) -> np.ndarray:
    return np.linalg.svd(matrix, full_matrices=False)[2][:rank]


def hidden_span_search(global_params: dict[str, np.ndarray], step: dict[str, np.ndarray], layers: tuple[str, str],
                       n: int, starts: np.ndarray, *, pixel_range=(0.0, 1.0), steps: int = STEPS
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Descend from every start (flattened images) to inputs consistent with the first two layers of ``step``;
    returns (inputs, residuals), one per start."""
    first, second = layers
    lo, hi = pixel_range
    w1 = step[f"{first}.weight"].astype(np.float64)
    span = _row_space(w1, n)                                                          # (n, d)
    plane, *_ = np.linalg.lstsq(w1 @ span.T, step[f"{first}.bias"].astype(np.float64), rcond=None)
    hidden = _row_space(step[f"{second}.weight"].astype(np.float64), n)
    outside = torch.tensor(np.eye(hidden.shape[1]) - hidden.T @ hidden)
    basis, plane = torch.tensor(span), torch.tensor(plane)
    weight = torch.tensor(global_params[f"{first}.weight"], dtype=torch.float64)
    bias = torch.tensor(global_params[f"{first}.bias"], dtype=torch.float64)
    coords = (torch.tensor(starts, dtype=torch.float64) @ basis.T).requires_grad_(True)
    optimizer = torch.optim.Adam([coords], lr=0.02)

    def residual():
        x = (coords / (coords @ plane).unsqueeze(1)) @ basis  # on the hyperplane x . z = 1
        h = torch.relu(x @ weight.T + bias)
        off_span = ((h @ outside) ** 2).sum(1) / ((h ** 2).sum(1) + 1e-12)
        off_box = (torch.relu(lo - x) ** 2 + torch.relu(x - hi) ** 2).sum(1)
        return off_span + off_box, x

    for _ in range(steps):
        optimizer.zero_grad()
        residual()[0].sum().backward()
        optimizer.step()
    with torch.no_grad():
        r, x = residual()
    return x.clamp(lo, hi).numpy(), r.numpy()


def distinct(points: np.ndarray, residuals: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``limit`` points and their residuals, lowest residual first, none within DUPLICATE of one kept."""
    kept: list[int] = []
    for i in np.argsort(residuals):
        if len(kept) == limit or not np.isfinite(residuals[i]):
            break
        if all(np.abs(points[i] - points[k]).max() > DUPLICATE for k in kept):
            kept.append(i)
    return points[kept], residuals[kept]


def per_example_gradients(model: nn.Module, global_params: dict[str, np.ndarray], images: torch.Tensor,
                          labels: torch.Tensor) -> torch.Tensor:
    """(examples, parameters): each example's loss gradient at the global weights, flattened in model order."""
    params = {name: torch.tensor(global_params[name]) for name, _ in model.named_parameters()}

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x[None],)), y[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, images, labels)
    return torch.cat([grads[name].reshape(len(images), -1) for name in params], dim=1)


def separate(model: nn.Module, global_params: dict[str, np.ndarray], step: dict[str, np.ndarray], n: int,
             step_size: float, input_shape: tuple[int, ...], num_classes: int, auxiliary: np.ndarray, *,
             pixel_range=(0.0, 1.0), seed: int = 0) -> Separation | None:
    """The N examples (and labels) behind ``step`` = ``new - global`` = ``-step_size * sum_s gradient_s``
    (for the mean of N clients' one-step updates at learning rate lr: lr / N). None if the model does not
    start Linear -> ReLU -> Linear or N is not below its hidden widths. ``auxiliary``: the adversary's own
    images, the starting points of the search."""
    layers = relu_pair(model)
    if layers is None:
        return None
    widths = [global_params[f"{name}.weight"].shape for name in layers]
    if not 1 <= n < min(widths[0][0], widths[1][0], widths[0][1]):
        return None
    rng = np.random.default_rng(seed)
    aux = np.asarray(auxiliary, np.float64).reshape(len(auxiliary), -1)
    names = [name for name, _ in model.named_parameters()]
    target = -np.concatenate([np.asarray(step[name], np.float64).ravel() for name in names])  # a step descends
    pool, scores = np.zeros((0, aux.shape[1])), np.zeros(0)
    left, missing = step, n
    for _ in range(DEFLATIONS + 1):
        starts = aux[rng.choice(len(aux), START_POINTS, replace=len(aux) < START_POINTS)]
        points, residuals = hidden_span_search(global_params, left, layers, missing, starts, pixel_range=pixel_range)
        found, found_scores = distinct(points, residuals, CANDIDATES_PER_EXAMPLE * missing)
        pool, scores = np.concatenate([pool, found]), np.concatenate([scores, found_scores])
        pool, scores = distinct(pool, scores, len(pool))
        columns = label_columns(model, global_params, pool, input_shape, num_classes)
        chosen, residual = select_examples(columns, target, n, step_size)
        # chosen ones on the search's noise floor are settled; the rest of the step is searched again with
        # fewer examples in it (a lower rank), where an example no start reached has a wider basin
        settled = [(c, label) for c, label in chosen if scores[c] <= FLOOR_FACTOR * scores.min()]
        missing = n - len(settled)
        if not missing:
            break
        mine = sum(columns[c, label] for c, label in settled) if settled else 0.0
        left = unflatten(-(target - step_size * mine), step, names)
    return Separation(images=_images(pool[[c for c, _ in chosen]], input_shape).numpy(),
                      labels=np.array([label for _, label in chosen], dtype=np.int64),
                      residual=residual, candidates=len(pool))


def _images(flat: np.ndarray, input_shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(flat, dtype=torch.float32).reshape(len(flat), *input_shape)


def unflatten(flat: np.ndarray, like: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for name in names:
        size = like[name].size
        out[name] = flat[at:at + size].reshape(like[name].shape)
        at += size
    return out


def label_columns(model: nn.Module, global_params: dict[str, np.ndarray], pool: np.ndarray,
                  input_shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    """(candidates, classes, parameters): each candidate's gradient with each label."""
    labels = torch.arange(num_classes).repeat(len(pool))
    grads = per_example_gradients(model, global_params, _images(pool, input_shape).repeat_interleave(num_classes, 0),
                                  labels)
    return grads.double().numpy().reshape(len(pool), num_classes, -1)


def select_examples(columns: np.ndarray, target: np.ndarray, n: int, step_size: float
                    ) -> tuple[list[tuple[int, int]], float]:
    """Which n (candidate, label) pairs add up to ``target`` as ``step_size * sum of their gradients``
    (``columns``: candidates x labels x parameters). One scalar for all, as the protocol takes it: a
    weight per example would let mixtures stand in for missing examples. Greedy (the pair that lowers the
    residual most), then swaps of one pair for another while they lower it; each candidate at most once.
    Computed on the Gram matrix of the columns. Returns (pairs, relative residual)."""
    count, labels, _ = columns.shape
    flat = columns.reshape(count * labels, -1)
    gram, moments, total = flat @ flat.T, flat @ target, float(target @ target)
    b = step_size
    diag = np.diag(gram)
    chosen: list[int] = []
    owner = np.repeat(np.arange(count), labels)

    def left_dot():  # <target - b * sum of chosen, column j> for every j
        return moments - b * gram[chosen].sum(0) if chosen else moments.copy()

    for _ in range(min(n, count)):
        gain = 2 * b * left_dot() - b * b * diag
        gain[np.isin(owner, owner[chosen])] = -np.inf
        chosen.append(int(np.argmax(gain)))
    improved = True
    while improved:
        improved = False
        for k in range(len(chosen)):
            dot = left_dot()
            i = chosen[k]
            # residual change when pair i gives way to pair j: b^2 |g_i - g_j|^2 + 2b <R, g_i - g_j>
            change = b * b * (gram[i, i] + diag - 2 * gram[i]) + 2 * b * (dot[i] - dot)
            others = [c for c in chosen if c != i]
            change[np.isin(owner, owner[others])] = np.inf
            j = int(np.argmin(change))
            if change[j] < -1e-12 * total:
                chosen[k], improved = j, True
    residual = total - 2 * b * moments[chosen].sum() + b * b * gram[np.ix_(chosen, chosen)].sum()
    return [(int(owner[j]), int(j % labels)) for j in chosen], float(np.sqrt(max(residual, 0.0) / total))




def step_residual(model: nn.Module, global_params: dict[str, np.ndarray], step: dict[str, np.ndarray],
                  step_size: float, images: np.ndarray, labels: np.ndarray) -> float:
    """|step + step_size * sum of the guesses' gradients| / |step|: how well a guess (any attack's) explains
    the observed step, on the same scale as :attr:`Separation.residual`."""
    names = [name for name, _ in model.named_parameters()]
    target = -np.concatenate([np.asarray(step[name], np.float64).ravel() for name in names])
    flat = np.asarray(images, np.float32).reshape(len(images), -1)
    grads = per_example_gradients(model, global_params, _images(flat, tuple(np.asarray(images).shape[1:])),
                                  torch.as_tensor(np.asarray(labels), dtype=torch.int64))
    fitted = step_size * grads.double().numpy().sum(0)
    return float(np.linalg.norm(target - fitted) / (np.linalg.norm(target) + 1e-300))


def separated_or(optimized: Inversion, model: nn.Module, global_params: dict[str, np.ndarray],
                 new_params: dict[str, np.ndarray], count: int, step_size: float, ds) -> Inversion:
    """The separation of a FedSGD step (global -> ``new_params``) when it explains the step better than
    ``optimized`` does, both scored by :func:`step_residual`, which the adversary can compute; else
    ``optimized``. The winner's ``method`` says which."""
    start = time.perf_counter()
    delta = parameter_delta(list(global_params.items()), list(new_params.items()))
    found = separate(model, global_params, delta, count, step_size, ds.input_shape, ds.num_classes, ds.x_test)
    if found is None or len(found.images) < count:
        return optimized
    own = step_residual(model, global_params, delta, step_size, optimized.images, optimized.labels)
    if found.residual >= own:
        return optimized
    return Inversion(images=found.images, labels=found.labels, distance=found.residual,  # a residual, not a cosine
                     iterations=optimized.iterations, wall_s=optimized.wall_s + time.perf_counter() - start,
                     method="hidden_span")
