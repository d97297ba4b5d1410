"""Leakage metrics for reconstructed images, membership scores, their baselines, and intervals for rates.

Every image metric compares a reconstruction with the image it was meant to
recover, on the data's real pixel range (the embedded digits are scaled to
[0, 1], so ``data_range`` defaults to 1). A number alone says little: each one
is meant to be reported beside the same number for a baseline the adversary
gets for free — the mean image of the auxiliary data it holds, or a random
guess — scored exactly the same way (see :func:`score_with_baselines`).

When an attack returns N reconstructions of N images without knowing which is
which (a batch or an aggregate), they are first paired with the originals by
Hungarian matching (:func:`match_reconstructions`), then scored.

Membership inference is scored from one score per candidate ("higher means
member"): ROC AUC with a bootstrap interval and TPR at low FPR with an exact
interval (:func:`membership_metrics`), beside a coin flip.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.stats import beta as beta_dist
from scipy.stats import norm, rankdata
from skimage.metrics import structural_similarity

# PSNR of a perfect reconstruction is infinite; the scorecard is JSON, which has no infinity.
# 100 dB is an MSE of 1e-10 on a unit range: below float32 rounding of the pixels themselves.
PSNR_CAP_DB = 100.0
# An 8x8 digit fits only small SSIM windows (skimage's default of 7 would leave one position).
SSIM_WIN_SIZE = 3
# FPRs at which the scorecard reports a membership attack's TPR (DESIGN.md metric names).
LOW_FPRS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0p1pct_fpr": 0.001}


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


# --- membership inference: ROC, AUC and TPR at low FPR ---

def _by_membership(scores, is_member) -> tuple[np.ndarray, np.ndarray]:
    """(members' scores, non-members' scores), checked: same shapes, finite, both sides present."""
    s = np.asarray(scores, dtype=np.float64)
    m = np.asarray(is_member, dtype=bool)
    if s.shape != m.shape:
        raise ValueError(f"scores {s.shape} and membership {m.shape} differ in shape")
    if not np.isfinite(s).all():
        raise ValueError("membership scores must be finite")
    if m.all() or not m.any():
        raise ValueError("need both members and non-members")
    return s[m], s[~m]


def mann_whitney_auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting half, from ranks; both sides must be non-empty."""
    ranks = rankdata(np.concatenate([positives, negatives]))
    n1, n0 = len(positives), len(negatives)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auc(scores, is_member) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half)."""
    return mann_whitney_auc(*_by_membership(scores, is_member))


def tpr_at_fpr(scores, is_member, fpr: float) -> tuple[int, int, int]:
    """(true positives, members, false positives) at the threshold admitting at most ``fpr`` of the non-members.

    The threshold is the (k+1)-th highest non-member score with k = floor(fpr * non-members);
    only scores strictly above it count, so ties never add false positives.
    """
    members, others = _by_membership(scores, is_member)
    k = int(np.floor(fpr * len(others) + 1e-9))
    threshold = np.sort(others)[::-1][k] if k < len(others) else -np.inf
    return int((members > threshold).sum()), len(members), int((others > threshold).sum())


def roc_points(scores, is_member) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) over every threshold, for plotting."""
    members, others = _by_membership(scores, is_member)
    thresholds = np.unique(np.concatenate([members, others]))[::-1]
    tpr = (members[None, :] >= thresholds[:, None]).mean(1)
    fpr = (others[None, :] >= thresholds[:, None]).mean(1)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def bootstrap_auc(members: np.ndarray, others: np.ndarray, n_bootstrap: int, rng) -> np.ndarray:
    """AUCs of ``n_bootstrap`` resamples (members and non-members resampled separately).

    A resample's AUC is ``w_m' C w_o / (n1 n0)`` with C the pairwise win matrix
    and w the resampling counts: one matrix product instead of a sort per resample.
    """
    n1, n0 = len(members), len(others)
    if n1 * n0 > 4_000_000:  # C would not fit comfortably: sort per resample instead
        flags = np.r_[np.ones(n1, bool), np.zeros(n0, bool)]
        return np.array([auc(np.concatenate([rng.choice(members, n1), rng.choice(others, n0)]), flags)
                         for _ in range(n_bootstrap)])
    wins = (members[:, None] > others[None, :]) + 0.5 * (members[:, None] == others[None, :])
    w_members = rng.multinomial(n1, np.full(n1, 1.0 / n1), size=n_bootstrap).astype(np.float64)
    w_others = rng.multinomial(n0, np.full(n0, 1.0 / n0), size=n_bootstrap).astype(np.float64)
    return ((w_members @ wins) * w_others).sum(1) / (n1 * n0)


def membership_metrics(scores, is_member, *, n_bootstrap: int = 1000, seed: int = 0,
                       confidence: float = 0.95) -> dict:
    """auc (bootstrap CI over members and non-members), TPR at 1% and 0.1% FPR (Clopper-Pearson CI
    over the members at that threshold; the threshold's own noise is not in it), counts.

    The smallest FPR measurable is 1 / non_members: below it "TPR at 0.1% FPR" means "at zero false positives".
    """
    members, others = _by_membership(scores, is_member)
    out: dict = {"auc": auc(scores, is_member)}
    boot = bootstrap_auc(members, others, n_bootstrap, np.random.default_rng(seed))
    tail = (1.0 - confidence) / 2
    lo, hi = np.quantile(boot, [tail, 1.0 - tail]) if len(boot) else (0.0, 1.0)
    # A percentile interval can miss a point estimate on a skewed bootstrap; widen rather than mislead.
    out["auc_ci"] = [float(min(lo, out["auc"])), float(max(hi, out["auc"]))]
    for name, fpr in LOW_FPRS.items():
        hits, n, false_pos = tpr_at_fpr(scores, is_member, fpr)
        out[name] = hits / n
        out[f"{name}_ci"] = list(rate_ci(hits, n, confidence=confidence, method="clopper_pearson"))
    out["members"], out["non_members"] = len(members), len(others)
    out["min_fpr"] = 1.0 / len(others)
    return out


def random_guess_baseline() -> dict:
    """What a coin flip gets against membership: AUC 0.5 and TPR equal to FPR at every threshold."""
    return {"auc": 0.5, **{name: fpr for name, fpr in LOW_FPRS.items()}, "guess": "random"}


def score_inversion(recon, labels, truth_idx, ds, seed: int = 0) -> dict:
    """Per-image scores of a reconstruction of the training images ``truth_idx`` of ``ds`` (and of its labels)
    and of the two blind guesses, kept per image so observations pool (:func:`pool_scores`).

    Reconstructions are paired with the originals (Hungarian) first; the guesses
    need no pairing. Labels go with their images.
    """
    originals, true_labels = ds.x_train[truth_idx], ds.y_train[truth_idx]
    guesses = {
        "metrics": (np.asarray(recon), np.asarray(labels) if labels is not None else None, True),
        "baseline": (mean_image_baseline(ds.x_test, len(originals)),  # the adversary's own data's mean
                     random_label_baseline(len(originals), ds.num_classes, seed=seed), False),
        "random": (random_image_baseline(originals.shape, seed=seed),
                   random_label_baseline(len(originals), ds.num_classes, seed=seed), False),
    }
    out = {}
    for key, (images, guessed, match) in guesses.items():
        order = match_reconstructions(images, originals) if match else np.arange(len(images))
        images = images[order]
        entry = {"per_image": per_image_scores(images, originals),
                 "reid": reidentified(images, truth_idx, ds.x_train)}
        if guessed is not None:
            entry["label_hits"] = guessed[order] == true_labels
        out[key] = entry
    return out


def pool_scores(scores: list[dict], key: str) -> dict:
    """Pool the images of every observation: median image scores, rates with 95% Wilson intervals."""
    out = {}
    for name in ("psnr_db", "ssim", "mse"):
        out[name] = float(np.median(np.concatenate([s[key]["per_image"][name] for s in scores])))
    reid = np.concatenate([s[key]["reid"] for s in scores])
    out["reid_rate"], out["reid_rate_ci"] = float(reid.mean()), list(rate_ci(int(reid.sum()), len(reid)))
    if all("label_hits" in s[key] for s in scores):
        hits = np.concatenate([s[key]["label_hits"] for s in scores])
        out["label_accuracy"] = float(hits.mean())
        out["label_accuracy_ci"] = list(rate_ci(int(hits.sum()), len(hits)))
    out["images"] = int(len(reid))
    return out
