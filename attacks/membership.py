"""Membership inference from a model's outputs: the loss-threshold attack and LiRA.

Threat model (the standard one of LiRA, Carlini et al. 2022, "Membership
Inference Attacks From First Principles"): the adversary can query the target
model on candidate examples and read its logits -- a *model-user* handed the
released weights, or an *he-client* reading the logits it decrypted from the
HE service. It knows the candidates' labels, the architecture and training
recipe (epochs, learning rate, batch size), and it holds a population of
examples from the same distribution as the target's training data, the
candidates included. It does not know which candidates were trained on.

* ``membership_loss`` (Yeom et al. 2018): a candidate whose cross-entropy
  loss is low is called a member; one global threshold for every example.
* ``membership_lira``: the adversary trains shadow models with the target's
  recipe on random halves of its population, so every candidate is IN about
  half of them and OUT of the rest. Per candidate it fits Gaussians to the
  logit-scaled confidence of the true class, ``log(p_y / (1 - p_y))``, over
  the IN and the OUT shadows, and scores the target's value by the
  likelihood ratio (*online*) or by how far above the OUT Gaussian it lies
  (*offline*, one-sided, OUT shadows only). With few shadows a variance
  pooled over all candidates is steadier than per-candidate ones (the
  paper's "fixed variance"), so that is the default.

Scores are "higher means member". Every function here takes logits, labels
and the shadows' logits, so the same code scores plaintext logits and logits
decrypted from the HE service. The scores are turned into AUC and TPR at low
FPR by :func:`attacks.metrics.membership_metrics`; the released model they are
read from is loaded by :mod:`attacks.released`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.special import logsumexp
from scipy.stats import norm

from attacks.metrics import membership_metrics, random_guess_baseline
from attacks.registry import attack, row
from attacks.released import TRAINING_PROTOCOLS, detect_protocol, load_released
from securecollab.models import build_model
from securecollab.plans import FedAvgPlan
from securecollab.training import TrainConfig, predict_logits, train_local
from securecollab.training import one_thread as one_torch_thread

# Floors the spread of a Gaussian fit: a candidate every shadow classifies identically has none.
MIN_STD = 1e-3


# --- what the adversary computes from one model's logits -----------------------------------------

def _logits_and_labels(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim < 2 or z.shape[-2] != len(y):
        raise ValueError(f"logits of shape {z.shape} do not fit {len(y)} labels")
    return z, y


def true_class_confidence(logits, labels) -> np.ndarray:
    """``log(p_y / (1 - p_y))`` of the true class, stably: ``z_y - logsumexp(other logits)``.

    Works on (N, C) logits or a stack (S, N, C) of shadow models' logits.
    """
    z, y = _logits_and_labels(logits, labels)
    true = np.take_along_axis(z, np.broadcast_to(y[:, None], (*z.shape[:-1], 1)), axis=-1)[..., 0]
    others = np.where(np.arange(z.shape[-1]) == y[..., None], -np.inf, z)
    return true - logsumexp(others, axis=-1)


def loss_scores(logits, labels) -> np.ndarray:
    """Membership scores of the loss attack: minus the cross-entropy loss of each candidate."""
    z, y = _logits_and_labels(logits, labels)
    log_p = z - logsumexp(z, axis=-1, keepdims=True)
    return np.take_along_axis(log_p, y[:, None], axis=-1)[:, 0]


@dataclass(frozen=True)
class Shadows:
    """The adversary's shadow models, seen only through their logits on the candidates.

    ``logits``: (S, N, C); ``inside``: (S, N) bool, whether candidate n was in
    shadow s's training set.
    """

    logits: np.ndarray
    inside: np.ndarray

    def __post_init__(self):
        if self.logits.ndim != 3 or self.inside.shape != self.logits.shape[:2]:
            raise ValueError(f"shadow logits {self.logits.shape} and membership {self.inside.shape} do not fit")

    @property
    def count(self) -> int:
        return int(self.logits.shape[0])

    def take(self, idx) -> "Shadows":
        """The shadows restricted to candidates ``idx`` (e.g. the balanced candidate set)."""
        return Shadows(self.logits[:, idx], self.inside[:, idx])


def _gaussian_fit(phi: np.ndarray, mask: np.ndarray, fixed_variance: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-candidate mean and std of ``phi`` (S, N) over the shadows where ``mask`` holds.

    A candidate no shadow covers gets the mean over all candidates (only with
    very few shadows); the std is pooled over every candidate when fixed.
    """
    count = mask.sum(0)
    total = np.where(mask, phi, 0.0).sum(0)
    fallback = total.sum() / max(count.sum(), 1)
    mean = np.where(count > 0, total / np.maximum(count, 1), fallback)
    resid2 = np.where(mask, (phi - mean) ** 2, 0.0)
    if fixed_variance:  # one mean per covered candidate was fitted: that many degrees of freedom are spent
        std = np.full(phi.shape[1], np.sqrt(resid2.sum() / max(count.sum() - (count > 0).sum(), 1)))
    else:
        std = np.sqrt(resid2.sum(0) / np.maximum(count - 1, 1))
    return mean, np.maximum(std, MIN_STD)


def lira_scores(target_logits, labels, shadows: Shadows, *, online: bool = True,
                fixed_variance: bool = True) -> np.ndarray:
    """LiRA membership scores of the target's logits on the candidates (Carlini et al. 2022).

    Online: ``log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out)``; offline:
    ``log P(Phi_out < phi)``, which needs no shadow trained on the candidate.
    """
    phi = true_class_confidence(target_logits, labels)
    shadow_phi = true_class_confidence(shadows.logits, labels)
    mu_out, sd_out = _gaussian_fit(shadow_phi, ~shadows.inside, fixed_variance)
    if not online:
        return norm.logcdf(phi, mu_out, sd_out)
    mu_in, sd_in = _gaussian_fit(shadow_phi, shadows.inside, fixed_variance)
    return norm.logpdf(phi, mu_in, sd_in) - norm.logpdf(phi, mu_out, sd_out)


def shadow_assignment(n_population: int, n_shadows: int, seed: int) -> np.ndarray:
    """(S, N) bool: which population examples each shadow trains on; each example in half of the shadows."""
    if n_shadows < 2:
        raise ValueError("LiRA needs at least two shadow models")
    order = np.random.default_rng(seed).random((n_shadows, n_population)).argsort(axis=0)
    return order < n_shadows // 2


def train_shadows(x: np.ndarray, y: np.ndarray, fit: Callable[[np.ndarray, np.ndarray, int], Callable],
                  *, n_shadows: int, seed: int, progress=None) -> Shadows:
    """Shadow models on halves of the population (x, y); their logits on every population example.

    ``fit(x_sub, y_sub, shadow_index)`` trains one model with the target's
    recipe and returns its ``predict(x) -> logits``.
    """
    inside = shadow_assignment(len(x), n_shadows, seed)
    logits = []
    kept = []
    with one_torch_thread():
        for s in range(n_shadows):
            predict = fit(x[inside[s]], y[inside[s]], s)
            out = np.asarray(predict(x), dtype=np.float64)
            # x^2 networks occasionally diverge from an unlucky start; the attacker would discard such a model
            if np.isfinite(out).all():
                logits.append(out)
                kept.append(s)
            if progress:
                progress(f"shadow model {s + 1}/{n_shadows}" + ("" if kept[-1:] == [s] else " diverged: dropped"))
    if len(kept) < 2:
        raise ValueError(f"only {len(kept)} of {n_shadows} shadow models trained to finite outputs")
    return Shadows(np.stack(logits), inside[kept])


# --- the candidates and the shadows' recipe -------------------------------------------------------

def balanced_candidates(n_members: int, n_non_members: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of as many members as non-members (the larger side subsampled), each side sorted."""
    rng = np.random.default_rng(seed)
    n = min(n_members, n_non_members)
    return np.sort(rng.choice(n_members, n, replace=False)), np.sort(rng.choice(n_non_members, n, replace=False))


@dataclass(frozen=True)
class Recipe:
    """How the target was trained, as the adversary believes: what its shadow models repeat."""

    model: str
    activation: str
    epochs: int
    lr: float
    momentum: float
    batch_size: int

    @classmethod
    def of_fedavg(cls, plan) -> "Recipe":
        """FedAvg/secagg/split over IID shards approximated by central training of the same total epochs."""
        return cls(plan.model, plan.activation, plan.rounds * plan.local_epochs, plan.lr, plan.momentum,
                   plan.batch_size)

    @classmethod
    def of_he(cls, plan, ds) -> "Recipe":
        """The HE server's recipe; its learning rate follows the data (HEModelPlan.learning_rate)."""
        return cls(plan.model, plan.activation, plan.epochs, plan.learning_rate(ds), plan.momentum, plan.batch_size)

    def fit(self, ds, seed: int) -> Callable[[np.ndarray, np.ndarray, int], Callable]:
        """A ``fit`` for :func:`train_shadows`: shadow s starts from its own seed (init and batch order)."""
        def fit(x, y, s):
            shadow_seed = seed * 1000 + s + 1
            model = build_model(self.model, ds.input_shape, ds.num_classes, activation=self.activation,
                                seed=shadow_seed)
            train_local(model, x, y, TrainConfig(epochs=self.epochs, lr=self.lr, momentum=self.momentum,
                                                 batch_size=self.batch_size, seed=shadow_seed))
            return lambda q: predict_logits(model, q)
        return fit


@dataclass(frozen=True)
class Candidates:
    """The balanced candidate set inside the adversary's population (train and test data, concatenated)."""

    x: np.ndarray          # population inputs
    y: np.ndarray          # population labels
    idx: np.ndarray        # candidates' positions in the population
    is_member: np.ndarray  # ground truth, for scoring only

    @classmethod
    def of_dataset(cls, ds, seed: int, per_side: int | None = None) -> "Candidates":
        """Members: the target's training set (subsampled); non-members: the held-out test set.

        ``per_side`` caps both sides (fewer queries); the population stays whole.
        """
        mem, non = balanced_candidates(len(ds.x_train), len(ds.x_test), seed)
        if per_side is not None:
            mem, non = mem[:per_side], non[:per_side]
        x = np.concatenate([ds.x_train, ds.x_test])
        y = np.concatenate([ds.y_train, ds.y_test])
        idx = np.concatenate([mem, len(ds.x_train) + non])
        return cls(x, y, idx, np.r_[np.ones(len(mem), bool), np.zeros(len(non), bool)])

    @property
    def queries(self) -> np.ndarray:
        return self.x[self.idx]

    @property
    def labels(self) -> np.ndarray:
        return self.y[self.idx]


def attack_scores(target_logits, cand: Candidates, shadows: Shadows | None,
                  variants=("loss", "online")) -> dict[str, np.ndarray]:
    """Membership scores of the candidates per variant: ``loss``, LiRA ``online`` / ``offline``."""
    out = {}
    for variant in variants:
        if variant == "loss":
            out[variant] = loss_scores(target_logits, cand.labels)
        elif variant in ("online", "offline"):
            if shadows is None:
                raise ValueError("LiRA needs shadow models")
            out[variant] = lira_scores(target_logits, cand.labels, shadows.take(cand.idx),
                                       online=variant == "online")
        else:
            raise ValueError(f"unknown variant {variant!r}")
    return out


def attack_rows(scores: dict[str, np.ndarray], is_member, *, protocol: str, adversary: str,
                shadow_models: int = 0, extra_metrics: dict | None = None, seed: int = 0, **extra) -> list[dict]:
    """One scorecard row per variant in ``scores`` (``membership_loss`` or ``membership_lira``)."""
    rows = []
    for variant, s in scores.items():
        # LiRA's shadows train on halves of a population that holds the candidates (members among them)
        name, tag = ("membership_loss", {}) if variant == "loss" else \
            ("membership_lira", {"variant": variant, "shadow_models": int(shadow_models),
                                 "population": "train and test splits, the candidates among them"})
        metrics = {**membership_metrics(s, is_member, seed=seed), **tag, **(extra_metrics or {})}
        rows.append(row(name, protocol, adversary, metrics, random_guess_baseline(), **extra))
    return rows


def _run_on_released(run_dir: Path, *, variants, plan_json: str | None, n_shadows: int, seed: int,
                     protocol: str | None) -> list[dict]:
    saved = run_dir / "plan.json"  # the run's public training recipe: its data split follows the plan's seed
    if plan_json is None and saved.is_file():
        plan_json = saved.read_text()
    plan = FedAvgPlan.from_json(plan_json) if plan_json else FedAvgPlan(seed=seed)
    protocol = protocol or detect_protocol(run_dir)
    model, plan = load_released(run_dir, protocol, plan)
    ds = plan.load_data()
    cand = Candidates.of_dataset(ds, seed)
    shadows = None
    if any(v != "loss" for v in variants):
        shadows = train_shadows(cand.x, cand.y, Recipe.of_fedavg(plan).fit(ds, seed), n_shadows=n_shadows,
                                seed=seed)
    scores = attack_scores(predict_logits(model, cand.queries), cand, shadows, variants)
    return attack_rows(scores, cand.is_member, protocol=protocol, adversary="model-user",
                       shadow_models=shadows.count if shadows else 0,
                       seed=seed, notes=f"recipe assumed: {json.dumps(Recipe.of_fedavg(plan).__dict__)}")


@attack("membership_loss", adversary="model-user", protocols=TRAINING_PROTOCOLS,
        summary="loss-threshold membership inference on the released model (members: its training set)")
def run_loss(run_dir: Path, *, plan_json: str | None = None, seed: int = 0, protocol: str | None = None,
             **_) -> list[dict]:
    """Options: ``plan_json`` (the FedAvgPlan of the run; default the run's plan.json, else the demo's),
    ``protocol`` (else detected)."""
    return _run_on_released(run_dir, variants=("loss",), plan_json=plan_json, n_shadows=0, seed=seed,
                            protocol=protocol)


@attack("membership_lira", adversary="model-user", protocols=TRAINING_PROTOCOLS,
        summary="LiRA (online, fixed variance) with shadow models trained on halves of the attacker's population")
def run_lira(run_dir: Path, *, plan_json: str | None = None, n_shadows: int = 8, seed: int = 0,
             protocol: str | None = None, **_) -> list[dict]:
    """Options as ``membership_loss``, plus ``n_shadows``."""
    return _run_on_released(run_dir, variants=("online",), plan_json=plan_json, n_shadows=n_shadows, seed=seed,
                            protocol=protocol)
