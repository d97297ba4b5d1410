"""A mixture of local Gaussians fitted to the adversary's own images, conditioned on an update's input plane.

Each of the adversary's images is the mean of one component; its covariance is that of its nearest images of
the same class (plus a ridge): the directions in which a digit like it varies (stroke width, slant, length).
Every input of the update lies on the plane, so each component's most likely point is its mean conditioned on
the plane, in closed form: it moves along the directions the component allows, where a Euclidean projection
(``auxiliary_span``) moves along the plane's normals whatever they draw. How likely the component makes the
plane weighs its point. Where the model begins Linear -> ReLU -> Linear, each point then descends on the
hidden vector's distance to the second layer's update row space, held near its component by the component's
own Mahalanobis distance (the hidden span is exact for the first mini-batch, which ran at the global weights,
and near for the later ones).
"""

from __future__ import annotations

import numpy as np
import torch

from attacks.input_plane import HiddenSpan, InputPlane

NEIGHBOURS = 20         # same-class images behind each component's covariance (itself included)
RIDGE = 0.003           # added to each covariance (pixels in [0, 1]): how far a point may leave its neighbours' span
PLANE_TEMPERATURE = 0.1  # a component's weight is its likelihood of the plane to this power (33 dims count at once)
REFINE_STEPS = 400
REFINE_LR = 0.003
HIDDEN_SIGMA = 0.01     # the hidden span's likelihood width in the refinement (relative distance)


def local_covariances(images: np.ndarray, labels: np.ndarray, *, neighbours: int = NEIGHBOURS,
                      ridge: float = RIDGE) -> np.ndarray:
    """(n, d, d): each image's component covariance, from its nearest images of its own class."""
    images = np.asarray(images, np.float64)
    covariances = np.empty((len(images), images.shape[1], images.shape[1]))
    ridge_matrix = ridge * np.eye(images.shape[1])
    for i, image in enumerate(images):
        same = np.flatnonzero(labels == labels[i])
        nearest = same[np.argsort(((images[same] - image) ** 2).sum(1))[:neighbours]]
        spread = np.cov(images[nearest].T) if len(nearest) > 1 else 0.0  # a class of one image: the ridge alone
        covariances[i] = spread + ridge_matrix
    return covariances


def condition_on_plane(plane: InputPlane, means: np.ndarray, covariances: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(each component's mean conditioned on lying on the plane, the log-likelihood of the plane under it)."""
    normal = plane.normal()                                     # (d, m): the plane is {x : normalᵀ x = offset}
    offset = normal.T @ plane.origin
    misfit = offset - means @ normal                            # (n, m)
    along = covariances @ normal                                # (n, d, m)
    spread = normal.T @ along                                   # (n, m, m): the component's variance off the plane
    solved = np.linalg.solve(spread, misfit[..., None])[..., 0]
    points = means + (along @ solved[..., None])[..., 0]
    log_likelihood = -0.5 * (misfit * solved).sum(1) - 0.5 * np.linalg.slogdet(spread)[1]
    return points, log_likelihood


def refine_on_hidden_span(plane: InputPlane, points: np.ndarray, means: np.ndarray, covariances: np.ndarray,
                          hidden: HiddenSpan, *, steps: int = REFINE_STEPS, sigma: float = HIDDEN_SIGMA,
                          pixel_range=(0.0, 1.0)) -> np.ndarray:
    """The points moved on the plane to fit the hidden span, each held near its component (MAP under both)."""
    origin, directions = torch.tensor(plane.origin), torch.tensor(plane.directions)
    centre, precision = torch.tensor(means), torch.tensor(np.linalg.inv(covariances))
    coordinates = ((torch.tensor(points) - origin) @ directions.T).requires_grad_(True)
    optimizer = torch.optim.Adam([coordinates], lr=REFINE_LR)
    for _ in range(steps):
        x = origin + coordinates @ directions
        away = x - centre
        loss = ((hidden.distance(x) / sigma) ** 2 + torch.einsum("ni,nij,nj->n", away, precision, away)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return np.clip((origin + coordinates @ directions).numpy(), *pixel_range)


def local_gaussian_candidates(plane: InputPlane, images: np.ndarray, labels: np.ndarray,
                              hidden: HiddenSpan | None, *, pixel_range=(0.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """(one point on the plane per auxiliary image, its log weight: the tempered likelihood of the plane)."""
    images = np.asarray(images, np.float64)
    covariances = local_covariances(images, np.asarray(labels))
    points, log_likelihood = condition_on_plane(plane, images, covariances)
    if hidden is not None:
        points = refine_on_hidden_span(plane, points, images, covariances, hidden, pixel_range=pixel_range)
    return points, PLANE_TEMPERATURE * (log_likelihood - log_likelihood.max())
