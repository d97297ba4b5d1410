"""Leakage metrics for reconstructed images, their baselines, and confidence intervals for rates.

Every image metric compares a reconstruction with the image it was meant to
recover, on the data's real pixel range (the embedded digits are scaled to
[0, 1], so ``data_range`` defaults to 1). A number alone says little: each one
is meant to be reported beside the same number for a baseline the adversary
gets for free — the mean image of the auxiliary data it holds, or a random
guess — scored exactly the same way (see :func:`score_with_baselines`).

When an attack returns N reconstructions of N images without knowing which is
which (a batch or an aggregate), they are first paired with the originals by
Hungarian matching (:func:`match_reconstructions`), then scored.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.stats import beta as beta_dist
from scipy.stats import norm
from skimage.metrics import structural_similarity

# PSNR of a perfect reconstruction is infinite; the scorecard is JSON, which has no infinity.
# 100 dB is an MSE of 1e-10 on a unit range: below float32 rounding of the pixels themselves.
PSNR_CAP_DB = 100.0
# An 8x8 digit fits only small SSIM windows (skimage's default of 7 would leave one position).
SSIM_WIN_SIZE = 3


def _pair(reconstruction, original) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(reconstruction, dtype=np.float64)
    o = np.asarray(original, dtype=np.float64)
    if r.shape != o.shape:
        raise ValueError(f"reconstruction has shape {r.shape}, original {o.shape}")
    return r, o


def mse(reconstruction, original) -> float:
    """Mean squared pixel error between one reconstruction and its original."""
    r, o = _pair(reconstruction, original)
    return float(np.mean((r - o) ** 2))


def psnr_db(reconstruction, original, *, data_range: float = 1.0, cap_db: float = PSNR_CAP_DB) -> float:
    """Peak signal-to-noise ratio in dB on a pixel range of width ``data_range``, capped at ``cap_db``."""
    err = mse(reconstruction, original)
    if err == 0.0:
        return cap_db
    return float(min(cap_db, 10.0 * math.log10(data_range ** 2 / err)))


def ssim(reconstruction, original, *, data_range: float = 1.0, win_size: int = SSIM_WIN_SIZE) -> float:
    """Structural similarity (scikit-image) of one image, (H, W) or channels-first (C, H, W)."""
    r, o = _pair(reconstruction, original)
    if r.ndim == 3 and r.shape[0] == 1:
        r, o = r[0], o[0]
    channel_axis = 0 if r.ndim == 3 else None
    return float(structural_similarity(r, o, data_range=data_range, win_size=win_size,
                                       channel_axis=channel_axis))


def match_reconstructions(reconstructions, originals) -> np.ndarray:
    """Pair N reconstructions with N originals at least total MSE (Hungarian matching).

    Returns ``order`` such that ``reconstructions[order[i]]`` is the one paired
    with ``originals[i]``. The attacker never sees this pairing; it only makes
    the score independent of the order in which an attack lists its guesses.
    """
    r = np.asarray(reconstructions, dtype=np.float64)
    o = np.asarray(originals, dtype=np.float64)
    if r.shape != o.shape:
        raise ValueError(f"reconstructions have shape {r.shape}, originals {o.shape}")
    flat_r, flat_o = r.reshape(len(r), -1), o.reshape(len(o), -1)
    # cost[i, j]: original i explained by reconstruction j
    cost = ((flat_o[:, None, :] - flat_r[None, :, :]) ** 2).mean(axis=2)
    rows, cols = linear_sum_assignment(cost)
    order = np.empty(len(o), dtype=np.int64)
    order[rows] = cols
    return order


def nearest_neighbours(images, pool) -> np.ndarray:
    """Index of each image's nearest neighbour (Euclidean, on pixels) in ``pool``."""
    a = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    p = np.asarray(pool, dtype=np.float64).reshape(len(pool), -1)
    dist = (a ** 2).sum(1)[:, None] - 2.0 * a @ p.T + (p ** 2).sum(1)[None, :]
    return dist.argmin(axis=1)


def reidentified(reconstructions, source_indices, pool) -> np.ndarray:
    """Per reconstruction: is its nearest neighbour in ``pool`` (e.g. the training set) its true source?

    ``source_indices[i]`` is the position in ``pool`` of the image that
    reconstruction i came from (known to the evaluator, not to the attacker).
    """
    return nearest_neighbours(reconstructions, pool) == np.asarray(source_indices)


def reid_rate(reconstructions, source_indices, pool) -> float:
    """Fraction of reconstructions whose nearest neighbour in ``pool`` is their source image."""
    return float(np.mean(reidentified(reconstructions, source_indices, pool)))


def label_accuracy(predicted, true) -> float:
    """Fraction of labels recovered exactly, position by position."""
    p, t = np.asarray(predicted), np.asarray(true)
    if p.shape != t.shape:
        raise ValueError(f"predicted labels have shape {p.shape}, true labels {t.shape}")
    return float(np.mean(p == t)) if p.size else float("nan")


def multiset_label_accuracy(predicted, true, num_classes: int) -> float:
    """Fraction of labels recovered as a multiset (order-free): what an aggregate can reveal at best."""
    p = np.bincount(np.asarray(predicted), minlength=num_classes)
    t = np.bincount(np.asarray(true), minlength=num_classes)
    return float(np.minimum(p, t).sum() / max(t.sum(), 1))


def rate_ci(successes: int, trials: int, *, confidence: float = 0.95,
            method: Literal["wilson", "clopper_pearson"] = "wilson") -> tuple[float, float]:
    """Two-sided confidence interval [low, high] for a success rate (e.g. reid_rate, label_accuracy).

    Wilson's score interval by default (good coverage at small n, never outside
    [0, 1]); Clopper–Pearson is exact and conservative.
    """
    if trials <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, {trials}], got {successes}")
    alpha = 1.0 - confidence
    if method == "clopper_pearson":
        low = 0.0 if successes == 0 else float(beta_dist.ppf(alpha / 2, successes, trials - successes + 1))
        high = 1.0 if successes == trials else float(beta_dist.ppf(1 - alpha / 2, successes + 1, trials - successes))
        return (low, high)
    if method != "wilson":
        raise ValueError(f"unknown interval method {method!r}")
    z = float(norm.ppf(1 - alpha / 2))
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    # At 0 or n successes a bound is exactly 0 or 1; elsewhere clamp rounding only.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return (low, high)


# --- baselines: what the adversary gets without looking at the observation at all ---

def mean_image_baseline(auxiliary_images, count: int) -> np.ndarray:
    """``count`` copies of the mean of the attacker's auxiliary images: the best blind guess in MSE."""
    aux = np.asarray(auxiliary_images, dtype=np.float32)
    return np.repeat(aux.mean(axis=0, keepdims=True), count, axis=0)


def random_image_baseline(shape: tuple[int, ...], *, pixel_range: tuple[float, float] = (0.0, 1.0),
                          seed: int = 0) -> np.ndarray:
    """Images of uniform random pixels over the valid range."""
    rng = np.random.default_rng(seed)
    return rng.uniform(pixel_range[0], pixel_range[1], size=shape).astype(np.float32)


def random_label_baseline(count: int, num_classes: int, *, seed: int = 0) -> np.ndarray:
    """Uniformly random labels: a blind guess scores 1/num_classes on average."""
    return np.random.default_rng(seed).integers(0, num_classes, size=count)


def per_image_scores(reconstructions, originals, *, data_range: float = 1.0) -> dict[str, np.ndarray]:
    """psnr_db, ssim and mse of each reconstruction against the original at the same position."""
    r, o = np.asarray(reconstructions), np.asarray(originals)
    if r.shape != o.shape:
        raise ValueError(f"reconstructions have shape {r.shape}, originals {o.shape}")
    return {
        "psnr_db": np.array([psnr_db(a, b, data_range=data_range) for a, b in zip(r, o)]),
        "ssim": np.array([ssim(a, b, data_range=data_range) for a, b in zip(r, o)]),
        "mse": np.array([mse(a, b) for a, b in zip(r, o)]),
    }


def score_reconstructions(reconstructions, originals, *, data_range: float = 1.0,
                          predicted_labels=None, true_labels=None,
                          pool=None, source_indices=None, match: bool = True) -> dict:
    """Scorecard metrics for one set of reconstructions: medians of the image metrics, and rates with CIs.

    With ``match`` the reconstructions (and their predicted labels) are first
    paired with the originals by Hungarian matching. Re-identification needs
    the candidate ``pool`` and each original's index in it.
    """
    r = np.asarray(reconstructions)
    o = np.asarray(originals)
    order = match_reconstructions(r, o) if match else np.arange(len(r))
    r = r[order]
    scores = per_image_scores(r, o, data_range=data_range)
    out: dict = {name: float(np.median(values)) for name, values in scores.items()}
    out["n_images"] = int(len(o))
    if pool is not None and source_indices is not None:
        hits = reidentified(r, source_indices, pool)
        out["reid_rate"] = float(hits.mean())
        out["reid_rate_ci"] = list(rate_ci(int(hits.sum()), len(hits)))
    if predicted_labels is not None and true_labels is not None:
        pred = np.asarray(predicted_labels)[order]
        hits = pred == np.asarray(true_labels)
        out["label_accuracy"] = float(hits.mean())
        out["label_accuracy_ci"] = list(rate_ci(int(hits.sum()), len(hits)))
    return out


def score_with_baselines(reconstructions, originals, auxiliary_images, *,
                         pixel_range: tuple[float, float] = (0.0, 1.0),
                         predicted_labels=None, true_labels=None, num_classes: int | None = None,
                         pool=None, source_indices=None, match: bool = True, seed: int = 0) -> dict:
    """``{"metrics": ..., "baseline": ..., "random": ...}`` for one attack, in the scorecard's vocabulary.

    ``baseline`` scores the mean auxiliary image, ``random`` uniform random
    pixels; both come with uniformly random labels. All three are scored the
    same way, so each metric can be read beside what a blind guess gets.
    """
    o = np.asarray(originals)
    data_range = pixel_range[1] - pixel_range[0]
    guesses = {
        "metrics": (np.asarray(reconstructions), predicted_labels),
        "baseline": (mean_image_baseline(auxiliary_images, len(o)), None),
        "random": (random_image_baseline(o.shape, pixel_range=pixel_range, seed=seed), None),
    }
    out = {}
    for key, (images, labels) in guesses.items():
        if labels is None and true_labels is not None and num_classes:
            labels = random_label_baseline(len(o), num_classes, seed=seed)
        out[key] = score_reconstructions(images, o, data_range=data_range, predicted_labels=labels,
                                         true_labels=true_labels, pool=pool, source_indices=source_indices,
                                         match=match and key == "metrics")
    return out
