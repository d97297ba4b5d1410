"""Reconstruction on the first layer's input plane with a prior from the adversary's own images (FedAvg regime).

Whatever local SGD did (several steps, momentum, weights that moved between them), the update of a first
Linear layer that sees the input is ``sum_s c_s x_sᵀ`` and its bias update ``sum_s c_s``. So the row
space of the weight update is the span of the k inputs (rank k while k is below the input size and the
width), and every input lies on the hyperplane ``x · z = 1`` of that span (z solves ``dW z = db``): a
(k-1)-dimensional plane, exact, that holds all k inputs. Which of its points are the inputs the plane does
not say (the optimization that unrolls the local steps stalls in local minima there); a prior does:

* ``auxiliary_span``: the adversary's own images, projected onto the plane;
* ``learned_latent``: an autoencoder trained on the adversary's own images; from the codes of those images
  (and perturbations of them) the decoder's output descends to the plane, and is then projected onto it.
  The decoder keeps the points digit-shaped where the plane alone would accept any mixture.
* ``local_gaussian``: a mixture of local Gaussians, one per adversary's image (its covariance from its
  nearest images of the same class), each conditioned on the plane in closed form and then moved toward the
  hidden span below (attacks/local_gaussian.py); how likely its component makes the plane multiplies a point's
  weight in the k-means.

The candidates crowd around the inputs. Weighted k-means groups them into k clusters (the weights steer where
the centres settle); a cluster's plain mean is one reconstruction, and the most common label among the
adversary's images behind its members is its label.
Where the model goes on Linear -> ReLU -> Linear, candidates are weighted by how near their hidden vector (at the
global weights) lies to the second layer's update row space, ``exp(-distance / HIDDEN_SCALE)``: that row space
lies in the span of the inputs' hidden vectors (each at the weights of its own mini-batch; all of that span when
at least k of the second layer's units are active for the batch: with the MLP's 32 and k = 32, a few silent
units leave it a few dimensions short), while a mixture of two inputs misses on the units where only one of
them is active (attacks/separation.py uses the same fact where it is exact).
Needs a first Linear layer on the input and k below the input size and that layer's width;
:func:`span_prior_inversions` returns nothing otherwise. In this project's sweeps that is plain FedAvg's
single update (N = 1, 32 images of 64 pixels); sums of N >= 2 clients' 32 images fill the input space.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from attacks.analytic_fc import input_layer_delta
from attacks.gradient_inversion import Inversion
from attacks.input_plane import HiddenSpan, InputPlane, input_plane
from attacks.local_gaussian import REFINE_STEPS, local_gaussian_candidates
from attacks.observed import parameter_delta
from attacks.separation import relu_pair

PRIORS = ("auxiliary_span", "learned_latent", "local_gaussian")
LATENT = 8              # the autoencoder's code size
AUTOENCODER_STEPS = 3000
SEARCH_STEPS = 400
STARTS_PER_IMAGE = 4    # latent starting points per auxiliary image
HIDDEN_SCALE = 0.1      # relative distance to the hidden span at which a candidate's weight falls by e


_trained: dict[tuple, tuple[nn.Module, nn.Module]] = {}  # one autoencoder per auxiliary set and seed, per process


def train_autoencoder(images: np.ndarray, *, latent: int = LATENT, steps: int = AUTOENCODER_STEPS,
                      seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder) fitted to ``images`` (flattened, pixels in [0, 1]) with denoising, seeded; trained
    once per process for the same images, size and seed (an attack inverts many updates with one prior)."""
    key = (np.asarray(images).shape, hash(np.ascontiguousarray(images).tobytes()), latent, steps, seed)
    if key not in _trained:
        _trained[key] = _fit_autoencoder(np.asarray(images), latent, steps, seed)
    return _trained[key]


def _fit_autoencoder(images: np.ndarray, latent: int, steps: int, seed: int) -> tuple[nn.Module, nn.Module]:
    x = torch.tensor(images, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = nn.Sequential(nn.Linear(x.shape[1], 128), nn.ReLU(), nn.Linear(128, latent))
        decoder = nn.Sequential(nn.Linear(latent, 128), nn.ReLU(), nn.Linear(128, x.shape[1]), nn.Sigmoid())
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=3e-3)
    for _ in range(steps):
        batch = x[torch.randint(0, len(x), (128,), generator=generator)]
        noisy = batch + 0.05 * torch.randn(batch.shape, generator=generator)
        loss = ((decoder(encoder(noisy)) - batch) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return encoder.requires_grad_(False), decoder.requires_grad_(False)


def candidates(plane: InputPlane, auxiliary: np.ndarray, prior: str, *, labels: np.ndarray,
               hidden: HiddenSpan | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(points on the plane, index of the auxiliary image each came from, each point's log weight) under
    ``prior``; ``labels`` are the auxiliary images' (local_gaussian's components are per class)."""
    everyone = np.arange(len(auxiliary))
    if prior == "auxiliary_span":
        return plane.project(auxiliary), everyone, np.zeros(len(auxiliary))
    if prior == "local_gaussian":
        points, log_weights = local_gaussian_candidates(plane, auxiliary, labels, hidden)
        return points, everyone, log_weights
    if prior != "learned_latent":
        raise ValueError(f"unknown prior {prior!r}; known: {', '.join(PRIORS)}")
    encoder, decoder = train_autoencoder(auxiliary, seed=seed)
    origin, directions = torch.tensor(plane.origin), torch.tensor(plane.directions)

    def off_plane(codes):
        out = decoder(codes).double()
        return out, ((out - origin - ((out - origin) @ directions.T) @ directions) ** 2).sum(1)

    generator = torch.Generator().manual_seed(seed)
    codes = encoder(torch.tensor(auxiliary, dtype=torch.float32)).repeat(STARTS_PER_IMAGE, 1)
    codes = (codes + 0.3 * codes.std(0) * torch.randn(codes.shape, generator=generator)).requires_grad_(True)
    optimizer = torch.optim.Adam([codes], lr=0.02)
    for _ in range(SEARCH_STEPS):
        optimizer.zero_grad()
        off_plane(codes)[1].sum().backward()
        optimizer.step()
    with torch.no_grad():
        decoded = off_plane(codes)[0].numpy()
    return plane.project(decoded), np.tile(everyone, STARTS_PER_IMAGE), np.zeros(len(decoded))


def hidden_weights(points: np.ndarray, hidden: HiddenSpan | None) -> np.ndarray:
    """Each candidate's weight from the distance of its hidden vector to the second layer's update row
    space (all ones when the model does not begin Linear -> ReLU -> Linear)."""
    if hidden is None:
        return np.ones(len(points))
    return np.exp(-hidden.distance(torch.from_numpy(np.asarray(points, np.float64))).numpy() / HIDDEN_SCALE)


def cluster(points: np.ndarray, weights: np.ndarray, sources: np.ndarray, auxiliary_labels: np.ndarray, k: int,
            num_classes: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k reconstructions (cluster means) and their labels (the commonest label of the members' sources)."""
    from sklearn.cluster import KMeans  # imported here: scikit-learn is slow to import
    assignment = KMeans(k, n_init=4, random_state=seed).fit_predict(points, sample_weight=weights)
    images = np.stack([points[assignment == c].mean(0) for c in range(k)])
    labels = np.array([np.bincount(auxiliary_labels[sources[assignment == c]], minlength=num_classes).argmax()
                       for c in range(k)], dtype=np.int64)
    return images, labels


def descent_steps(prior: str, hidden: HiddenSpan | None) -> int:
    """Descent steps each candidate took under ``prior`` (local_gaussian descends toward a hidden span only)."""
    if prior == "learned_latent":
        return SEARCH_STEPS
    return REFINE_STEPS if prior == "local_gaussian" and hidden is not None else 0


def span_prior_inversions(model: nn.Module, global_params: dict[str, np.ndarray], new_params: dict[str, np.ndarray],
                          k: int, ds, priors=PRIORS, *, auxiliary: tuple[np.ndarray, np.ndarray] | None = None,
                          pixel_range=(0.0, 1.0), seed: int = 0) -> dict[str, Inversion]:
    """Prior -> the k inputs behind one update (global -> ``new_params``) under it; empty where the model or
    k leave no input plane. The plane and the hidden span are read once for all priors. ``auxiliary``: the
    adversary's (images, labels), by default the test split."""
    first = input_layer_delta(model, global_params, new_params)
    plane = None if first is None else input_plane(*first, k)
    if plane is None:
        return {}
    delta = parameter_delta(list(global_params.items()), list(new_params.items()))
    hidden = HiddenSpan.of(global_params, delta, relu_pair(model))
    images, labels = auxiliary if auxiliary is not None else (ds.x_test, ds.y_test)
    if len(images) < k:
        raise ValueError(f"the adversary's auxiliary set has {len(images)} images, fewer than the {k} inputs to "
                         "reconstruct: each reconstruction is a cluster of its candidates")
    flat = np.asarray(images, np.float64).reshape(len(images), -1)
    off = np.linalg.norm(flat - plane.project(flat), axis=1) / (np.linalg.norm(flat, axis=1) + 1e-12)
    found = {}
    for prior in priors:
        start = time.perf_counter()
        points, sources, log_weights = candidates(plane, flat, prior, labels=np.asarray(labels), hidden=hidden,
                                                  seed=seed)
        points = np.clip(points, *pixel_range)
        weights = hidden_weights(points, hidden) * np.exp(log_weights)
        guesses, guessed = cluster(points, weights, sources, np.asarray(labels), k, ds.num_classes, seed=seed)
        found[prior] = Inversion(images=guesses.astype(np.float32).reshape(k, *ds.input_shape), labels=guessed,
                                 distance=float(np.median(off)),  # how far the adversary's own images lie off it
                                 iterations=descent_steps(prior, hidden),
                                 wall_s=time.perf_counter() - start, method=prior)
    return found


def span_prior_inversion(model: nn.Module, global_params: dict[str, np.ndarray], new_params: dict[str, np.ndarray],
                         k: int, ds, prior: str, **options) -> Inversion | None:
    """One prior's reconstruction (:func:`span_prior_inversions`); None where there is no input plane."""
    return span_prior_inversions(model, global_params, new_params, k, ds, (prior,), **options).get(prior)
