"""The plane on which every input of an update lies, and the second layer's update row space (the geometry
attacks/span_prior.py and attacks/local_gaussian.py search in)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class InputPlane:
    """The affine plane ``origin + span(directions)`` on which every input of an update lies."""

    origin: np.ndarray      # (d,)
    directions: np.ndarray  # (k - 1, d), orthonormal rows

    def project(self, points: np.ndarray) -> np.ndarray:
        return self.origin + ((points - self.origin) @ self.directions.T) @ self.directions

    def normal(self) -> np.ndarray:
        """(d, d - k + 1) orthonormal columns spanning the directions off the plane."""
        return np.linalg.svd(self.directions.T, full_matrices=True)[0][:, len(self.directions):]


def input_plane(weight_delta: np.ndarray, bias_delta: np.ndarray, k: int) -> InputPlane | None:
    """The plane of the k inputs behind a first layer's update; None when k is not below the layer's
    width and input size, or fewer than k independent inputs moved the layer."""
    w = np.asarray(weight_delta, np.float64)
    b = np.asarray(bias_delta, np.float64)
    if not 1 <= k < min(w.shape):
        return None
    _, singular, vt = np.linalg.svd(w, full_matrices=False)
    if singular[k - 1] <= 1e-5 * singular[0]:
        return None
    span = vt[:k]
    coefficients, *_ = np.linalg.lstsq(w @ span.T, b, rcond=None)
    z = span.T @ coefficients  # x . z = 1 for every input (in the span: dW z = db)
    along = span - np.outer(span @ z, z) / (z @ z)
    return InputPlane(origin=z / (z @ z), directions=np.linalg.svd(along, full_matrices=False)[2][:k - 1])


@dataclass
class HiddenSpan:
    """The second layer's update row space, and the first layer at the global weights that gives a point its
    hidden vector (the model begins Linear -> ReLU -> Linear)."""

    weight: np.ndarray  # (h, d) first layer at the global weights
    bias: np.ndarray    # (h,)
    rows: np.ndarray    # (r, h) orthonormal: the second layer's update row space

    @classmethod
    def of(cls, global_params: dict[str, np.ndarray], delta: dict[str, np.ndarray], layers: tuple[str, str] | None
           ) -> HiddenSpan | None:
        if layers is None:
            return None
        first, second = layers
        _, singular, vt = np.linalg.svd(np.asarray(delta[f"{second}.weight"], np.float64), full_matrices=False)
        return cls(np.asarray(global_params[f"{first}.weight"], np.float64),
                   np.asarray(global_params[f"{first}.bias"], np.float64), vt[singular > 1e-6 * singular[0]])

    def distance(self, points: torch.Tensor) -> torch.Tensor:
        """Relative distance of each point's hidden vector to the row space (float64, differentiable)."""
        weight, bias, rows = (torch.from_numpy(a) for a in (self.weight, self.bias, self.rows))
        hidden = torch.relu(points @ weight.T + bias)
        return (hidden - (hidden @ rows.T) @ rows).norm(dim=1) / (hidden.norm(dim=1) + 1e-12)
