"""DP-SGD for local training (issue 8): per-example clipping, Gaussian noise, Poisson batches.

A client that trains with :func:`train_local_dp` sends updates that are
(epsilon, delta)-differentially private with respect to any one of its
training examples, against every party that sees the updates (the aggregator
in FedAvg, the coordinator/compute parties' revealed aggregate in secure
aggregation). :func:`epsilon` gives the guarantee for the total number of
steps a client took, composed over all rounds.

What the guarantee assumes, and the adversary therefore must not know: the
noise and the Poisson batch draws. They come from a generator seeded with
``private_seed``, a value the client keeps to itself. ``cfg.seed`` alone is
not enough: in FedAvg it is derived from the plan, which the aggregator holds,
so an aggregator could replay noise drawn from it and subtract it. With
``private_seed=None`` fresh OS entropy is used (sound, not reproducible);
pass a fixed private seed to replay a run exactly.

Opacus supplies the per-sample gradients (``GradSampleModule``), the
clip-and-noise step (``DPOptimizer``) and the RDP accountant; the wrapping is
undone before returning so the caller's model keeps its plain parameter
names and carries no hooks into the next round.
"""

from __future__ import annotations

import math
import secrets
import warnings

import numpy as np
import torch
from opacus.accountants import RDPAccountant
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from securecollab.training import TrainConfig

# Attributes opacus leaves on parameters (per-sample grads, accumulators).
_OPACUS_PARAM_ATTRS = ("grad_sample", "summed_grad", "_forward_counter",
                       "_current_grad_sample", "_norm_sample")


def check_dp_params(noise_multiplier: float, max_grad_norm: float) -> None:
    """Refuse settings that give no (or a meaningless) guarantee."""
    if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    if not math.isfinite(max_grad_norm) or max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm (the clipping bound) must be finite and > 0, got {max_grad_norm}")


def sample_rate(n: int, batch_size: int) -> float:
    """Poisson sampling rate q = batch_size / n (capped at 1: every example in every batch)."""
    if n <= 0:
        raise ValueError("cannot train on an empty data set")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return min(1.0, batch_size / n)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """As many steps as plain training takes per epoch, so DP and plain runs are step-for-step comparable."""
    return math.ceil(n / batch_size)


def poisson_batches(n: int, q: float, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`steps` batches, each holding every example independently with probability q (sizes vary, may be 0)."""
    return [np.flatnonzero(rng.random(n) < q) for _ in range(steps)]


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of `steps` DP-SGD steps at (noise_multiplier, sample_rate), via opacus's RDP accountant.

    Pass the total steps over all rounds: the rounds compose. Returns inf for
    noise 0 (no guarantee) and 0.0 for no steps; keep inf out of JSON rows.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    accountant = RDPAccountant()
    accountant.history.append((float(noise_multiplier), float(sample_rate), int(steps)))
    return float(accountant.get_epsilon(delta))


def _generators(cfg: TrainConfig, epoch: int, private_seed: int) -> tuple[np.random.Generator, torch.Generator]:
    """Batch and noise generators of one epoch; pure functions of (cfg.seed, epoch, private_seed)."""
    batches = np.random.default_rng([cfg.seed, epoch, private_seed, 0])
    noise = torch.Generator().manual_seed(
        int(np.random.default_rng([cfg.seed, epoch, private_seed, 1]).integers(2**63 - 1)))
    return batches, noise


def _strip_opacus(model: nn.Module) -> None:
    """Remove every attribute opacus attached to the parameters, and stale gradients."""
    for p in model.parameters():
        for attr in _OPACUS_PARAM_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None


def train_local_dp(model: nn.Module, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, *,
                   noise_multiplier: float, max_grad_norm: float, epoch_offset: int = 0,
                   accountant_state: RDPAccountant | None = None, private_seed: int | None = None,
                   progress=None) -> tuple[float, int]:
    """DP-SGD (SGD with cfg.lr/momentum) over (x, y) for cfg.epochs epochs, in place on `model`.

    Each step: a Poisson batch at rate q = batch_size/len(x); per-example
    gradients clipped to L2 norm `max_grad_norm`; Gaussian noise of std
    noise_multiplier * max_grad_norm added to their sum; divided by the
    expected batch size q * len(x). Returns (mean loss of the last epoch,
    steps taken). If `accountant_state` (an opacus accountant) is given, every
    step is recorded in it, so one accountant kept across rounds composes them.
    """
    check_dp_params(noise_multiplier, max_grad_norm)
    n = len(x)
    q = sample_rate(n, cfg.batch_size)
    if len(y) != n:
        raise ValueError(f"x has {n} examples but y has {len(y)}")
    if private_seed is None:
        private_seed = secrets.randbits(63)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    loss_fn = nn.CrossEntropyLoss()

    # GradSampleModule hooks the caller's modules in place; its own parameter
    # names gain a "_module." prefix, so the caller never sees the wrapper.
    gsm = GradSampleModule(model, loss_reduction="mean")
    try:
        base = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        opt = DPOptimizer(base, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                          expected_batch_size=q * n, loss_reduction="mean")
        gsm.train()
        steps, last = 0, float("nan")
        for e in range(cfg.epochs):
            batch_rng, opt.generator = _generators(cfg, epoch_offset + e, private_seed)
            total, count = 0.0, 0
            for idx in poisson_batches(n, q, steps_per_epoch(n, cfg.batch_size), batch_rng):
                opt.zero_grad()
                idx = torch.from_numpy(idx)
                # An empty draw still costs a step: noise alone, as the accountant assumes.
                loss = loss_fn(gsm(xt[idx]), yt[idx]) if len(idx) else gsm(xt[:0]).sum()
                with warnings.catch_warnings():
                    # Opacus's hooks fire on the first layer, whose input needs no grad: benign.
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                opt.step()
                steps += 1
                if accountant_state is not None:
                    accountant_state.step(noise_multiplier=noise_multiplier, sample_rate=q)
                if len(idx):
                    total += loss.item() * len(idx)
                    count += len(idx)
            last = total / count if count else float("nan")
            if progress:
                progress(e + 1, last)
        return last, steps
    finally:
        gsm.remove_hooks()
        _strip_opacus(model)
