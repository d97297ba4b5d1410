"""Local Gaussians conditioned on an update's input plane (attacks/local_gaussian.py): the closed form."""

import numpy as np
import torch

from attacks import local_gaussian
from attacks.input_plane import HiddenSpan, input_plane
from attacks.local_gaussian import (condition_on_plane, local_covariances, local_gaussian_candidates,
                                    refine_on_hidden_span)


def plane_of(images: np.ndarray, width: int = 64):
    """The input plane of a first layer's update made from ``images`` (the shape local SGD gives it)."""
    rng = np.random.default_rng(1)
    coefficients = rng.normal(size=(width, len(images)))
    return input_plane(coefficients @ images, coefficients.sum(1), len(images))


def test_a_component_that_allows_the_missing_directions_lands_on_the_input_itself():
    """Mean = an input + an offset in a subspace S, covariance spread over S: conditioning on the plane undoes
    the offset exactly (the plane's normals see all of S), where a Euclidean projection does not."""
    rng = np.random.default_rng(0)
    images = rng.random((8, 64))
    plane = plane_of(images)
    support = np.linalg.qr(rng.normal(size=(64, 5)))[0]          # S: 5 directions
    offset = support @ rng.normal(size=5) * 0.3
    mean = images[0] + offset
    covariance = support @ support.T + 1e-9 * np.eye(64)
    points, _ = condition_on_plane(plane, mean[None], covariance[None])
    assert np.abs(points[0] - images[0]).max() < 1e-5
    assert np.abs(plane.project(mean[None])[0] - images[0]).max() > 0.01


def test_conditioned_points_lie_on_the_plane_and_near_components_are_likelier():
    rng = np.random.default_rng(0)
    images = rng.random((8, 64))
    plane = plane_of(images)
    means = np.stack([images[1] + 0.01 * rng.normal(size=64), images[1] + 0.5 * rng.normal(size=64)])
    covariances = np.repeat(0.01 * np.eye(64)[None], 2, axis=0)
    points, log_likelihood = condition_on_plane(plane, means, covariances)
    assert np.abs(plane.project(points) - points).max() < 1e-9
    assert log_likelihood[0] > log_likelihood[1]


def test_covariances_come_from_the_same_class_only_and_a_lone_image_keeps_the_ridge():
    images = np.zeros((5, 64))
    images[:4, 0] = [0.0, 0.1, 0.2, 0.3]   # class 0 varies in pixel 0 only
    images[4, 1] = 1.0                     # class 1 has one image
    covariances = local_covariances(images, np.array([0, 0, 0, 0, 1]), neighbours=4, ridge=1e-3)
    assert covariances[0][0, 0] > 1e-3 and np.allclose(covariances[0][1:, 1:], 1e-3 * np.eye(63))
    assert np.allclose(covariances[4], 1e-3 * np.eye(64))


def test_the_plane_likelihood_is_the_gaussian_density_of_the_normal_coordinates():
    """Against scipy: components with different covariances differ from the exact log-density by one constant."""
    from scipy.stats import multivariate_normal
    rng = np.random.default_rng(0)
    images = rng.random((8, 64))
    plane = plane_of(images)
    means = images[:3] + 0.2 * rng.normal(size=(3, 64))
    factors = [rng.normal(size=(64, 6)) * scale for scale in (0.1, 0.3, 0.05)]
    covariances = np.stack([f @ f.T + 0.01 * np.eye(64) for f in factors])
    _, log_likelihood = condition_on_plane(plane, means, covariances)
    normal = plane.normal()
    exact = [multivariate_normal(normal.T @ m, normal.T @ c @ normal).logpdf(normal.T @ plane.origin)
             for m, c in zip(means, covariances)]
    assert np.ptp(log_likelihood - np.array(exact)) < 1e-8
    assert np.ptp(log_likelihood) > 1.0  # the three really differ


def hidden_span_of(vectors: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> HiddenSpan:
    rows = np.linalg.qr(np.maximum(vectors @ weight.T + bias, 0).T)[0].T
    return HiddenSpan(weight=weight, bias=bias, rows=rows)


def test_refinement_keeps_a_conditioned_mean_when_every_hidden_vector_fits_and_moves_toward_the_span_otherwise():
    rng = np.random.default_rng(0)
    images = rng.random((8, 64))
    plane = plane_of(images)
    means = images[:4] + 0.1 * rng.normal(size=(4, 64))
    factors = rng.normal(size=(4, 64, 6)) * 0.2                   # anisotropic: the pull must use the precision
    covariances = factors @ factors.transpose(0, 2, 1) + 0.01 * np.eye(64)
    start, _ = condition_on_plane(plane, means, covariances)
    weight, bias = rng.normal(size=(48, 64)) / 8, rng.normal(size=48) * 0.1
    everything = HiddenSpan(weight=weight, bias=bias, rows=np.eye(48))
    assert np.abs(refine_on_hidden_span(plane, start, means, covariances, everything) - start).max() < 1e-3
    inputs = hidden_span_of(images, weight, bias)                  # the inputs' own hidden span
    moved = refine_on_hidden_span(plane, start, means, covariances, inputs)
    before, after = (inputs.distance(torch.from_numpy(p)).numpy() for p in (start, moved))
    assert (after < 0.8 * before).all()


def test_components_in_groups_give_what_all_at_once_gives(monkeypatch):
    """Large images go a few components at a time (a (d, d) covariance each): same points, same weights."""
    rng = np.random.default_rng(0)
    inputs = rng.random((8, 64))
    plane = plane_of(inputs)
    auxiliary, labels = rng.random((12, 64)), np.repeat([0, 1, 2], 4)
    weight, bias = rng.normal(size=(48, 64)) / 8, rng.normal(size=48) * 0.1
    hidden = hidden_span_of(inputs, weight, bias)
    whole = local_gaussian_candidates(plane, auxiliary, labels, hidden)
    monkeypatch.setattr(local_gaussian, "CHUNK_BYTES", 8 * 64 * 64 * 4 * 3)  # groups of 3 components
    grouped = local_gaussian_candidates(plane, auxiliary, labels, hidden)
    assert np.allclose(grouped[0], whole[0], atol=1e-10) and np.allclose(grouped[1], whole[1])
    assert np.abs(plane.project(grouped[0]) - grouped[0]).max() < 1e-8
    assert np.ptp(whole[1]) > 0.1  # the weights differ, so a per-group normalisation would show
