"""A mixture of local Gaussians fitted to the adversary's own images, conditioned on an update's input plane.

Each of the adversary's images is the mean of one component; its covariance is that of its nearest images of
the same class (plus a ridge): the directions in which a digit like it varies (stroke width, slant, length).
Every input of the update lies on the plane, so each component's most likely point is its mean conditioned on
the plane, in closed form: it moves along the directions the component allows, where a Euclidean projection
(``auxiliary_span``) moves along the plane's normals whatever they draw. How likely the component makes the
plane gives its point a weight. Where the model begins Linear -> ReLU -> Linear, each point then descends on
its hidden vector's distance to the second layer's update row space, held near its component by the
component's own Mahalanobis distance. The inputs' hidden vectors lie near that row space, not on it (a few
silent second-layer units leave it short of their span, and later mini-batches ran at moved weights), so
``HIDDEN_SIGMA`` is a tuned strength of that pull, not the width of an exact likelihood.
"""

from __future__ import annotations

import numpy as np
import torch

from attacks.input_plane import HiddenSpan, InputPlane

NEIGHBOURS = 20         # same-class images behind each component's covariance (itself included)
RIDGE = 0.003           # added to each covariance (pixels in [0, 1]): how far a point may leave its neighbours' span
PLANE_TEMPERATURE = 0.1  # weight = likelihood of the plane to this power: all its normal directions count at once
REFINE_STEPS = 400
REFINE_LR = 0.003
HIDDEN_SIGMA = 0.01     # strength of the pull toward the hidden span (tuned by hand: 0.003 to 0.03 tried)
CHUNK_BYTES = 64 << 20  # components are handled in groups holding about this much of (d, d) matrices


def local_covariances(images: np.ndarray, labels: np.ndarray, *, neighbours: int = NEIGHBOURS,
                      ridge: float = RIDGE, among: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """(n, d, d): each image's component covariance, from its nearest images of its own class in ``among``
    (images, labels; by default the images themselves)."""
    images, labels = np.asarray(images, np.float64), np.asarray(labels)
    pool, pool_labels = (images, labels) if among is None else (np.asarray(among[0], np.float64),
                                                                 np.asarray(among[1]))
    covariances = np.empty((len(images), images.shape[1], images.shape[1]))
    ridge_matrix = ridge * np.eye(images.shape[1])
    for i, image in enumerate(images):
        same = np.flatnonzero(pool_labels == labels[i])
        nearest = same[np.argsort(((pool[same] - image) ** 2).sum(1))[:neighbours]]
        spread = np.cov(pool[nearest].T) if len(nearest) > 1 else 0.0  # a class of one image: the ridge alone
        covariances[i] = spread + ridge_matrix
    return covariances


def condition_on_plane(plane: InputPlane, means: np.ndarray, covariances: np.ndarray,
                       normal: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(each component's mean conditioned on lying on the plane, the log-likelihood of the plane under it, up
    to a constant shared by all components); ``normal``: the plane's, if already computed."""
    means, covariances = np.asarray(means, np.float64), np.asarray(covariances, np.float64)
    normal = plane.normal() if normal is None else normal       # (d, m): the plane is {x : normalᵀ x = offset}
    offset = normal.T @ plane.origin
    misfit = offset - means @ normal                            # (n, m)
    along = covariances @ normal                                # (n, d, m)
    spread = normal.T @ along                                   # (n, m, m): the component's variance off the plane
    solved = np.linalg.solve(spread, misfit[..., None])[..., 0]
    points = means + (along @ solved[..., None])[..., 0]
    log_likelihood = -0.5 * (misfit * solved).sum(1) - 0.5 * np.linalg.slogdet(spread)[1]
    return points, log_likelihood


def refine_on_hidden_span(plane: InputPlane, points: np.ndarray, means: np.ndarray, covariances: np.ndarray,
                          hidden: HiddenSpan, *, steps: int = REFINE_STEPS, sigma: float = HIDDEN_SIGMA
                          ) -> np.ndarray:
    """The points moved on the plane toward the hidden span, each held near its component."""
    origin, directions = torch.from_numpy(plane.origin), torch.from_numpy(plane.directions)
    centre = torch.from_numpy(np.asarray(means, np.float64))
    precision = torch.from_numpy(np.linalg.inv(np.asarray(covariances, np.float64)))
    coordinates = ((torch.from_numpy(np.asarray(points, np.float64)) - origin) @ directions.T).requires_grad_(True)
    optimizer = torch.optim.Adam([coordinates], lr=REFINE_LR)
    for _ in range(steps):
        x = origin + coordinates @ directions
        away = x - centre
        loss = ((hidden.distance(x) / sigma) ** 2 + torch.einsum("ni,nij,nj->n", away, precision, away)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (origin + coordinates @ directions).numpy()


def local_gaussian_candidates(plane: InputPlane, images: np.ndarray, labels: np.ndarray,
                              hidden: HiddenSpan | None) -> tuple[np.ndarray, np.ndarray]:
    """(one point on the plane per auxiliary image, its log weight: the tempered likelihood of the plane).
    Components go in groups (each holds a (d, d) covariance), so memory stays bounded for large images."""
    images, labels = np.asarray(images, np.float64), np.asarray(labels)
    group = max(1, CHUNK_BYTES // (8 * images.shape[1] ** 2 * 4))  # covariances, precisions and two temporaries
    points, log_likelihood, normal = [], [], plane.normal()
    for first in range(0, len(images), group):
        means = images[first:first + group]
        covariances = local_covariances(means, labels[first:first + group], among=(images, labels))
        found, likelihood = condition_on_plane(plane, means, covariances, normal)
        if hidden is not None:
            found = refine_on_hidden_span(plane, found, means, covariances, hidden)
        points.append(found)
        log_likelihood.append(likelihood)
    log_likelihood = np.concatenate(log_likelihood)
    return np.concatenate(points), PLANE_TEMPERATURE * (log_likelihood - log_likelihood.max())
