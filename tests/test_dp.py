"""DP-SGD local training (securecollab/dp.py): accounting, clipping, noise, reproducibility, model hygiene."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from scipy.optimize import brentq
from scipy.stats import norm

from securecollab.dp import _generators, epsilon, poisson_batches, sample_rate, steps_per_epoch, train_local_dp
from securecollab.models import build_model, load_arrays, parameters_to_arrays
from securecollab.training import TrainConfig, train_local

SHAPE = (1, 8, 8)


def data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *SHAPE)).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)


def model(name: str = "mlp"):
    return build_model(name, SHAPE, 10, seed=0)


def flat(m) -> np.ndarray:
    return np.concatenate([a.ravel() for _, a in parameters_to_arrays(m)]).astype(np.float64)


# ---------------------------------------------------------------- accounting

def test_epsilon_decreases_with_noise_and_grows_with_steps():
    by_noise = [epsilon(s, 0.05, 500, 1e-5) for s in (0.6, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:])), by_noise
    by_steps = [epsilon(1.0, 0.05, t, 1e-5) for t in (10, 100, 1000)]
    assert all(a < b for a, b in zip(by_steps, by_steps[1:])), by_steps
    assert epsilon(1.0, 0.05, 0, 1e-5) == 0.0
    assert epsilon(0.0, 0.05, 10, 1e-5) == math.inf


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism with sensitivity/std = mu (Balle & Wang 2018, Thm 8)."""
    def excess(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta
    return brentq(excess, 0.0, 100.0)


def test_epsilon_without_subsampling_bounds_the_exact_gaussian_mechanism():
    # q = 1: T steps at noise sigma compose to one Gaussian mechanism with mu = sqrt(T)/sigma.
    # RDP is an upper bound on the exact epsilon and, at this size, not a loose one.
    sigma, steps, delta = 4.0, 16, 1e-5
    exact = _exact_gaussian_epsilon(math.sqrt(steps) / sigma, delta)
    rdp = epsilon(sigma, 1.0, steps, delta)
    assert exact <= rdp <= 1.3 * exact, (exact, rdp)


def test_epsilon_agrees_with_an_independent_accountant_under_subsampling():
    # PRV is numerically (near) tight; RDP must upper-bound it and be within a small factor.
    sigma, q, steps, delta = 1.0, 0.01, 1000, 1e-5
    prv = PRVAccountant()
    prv.history.append((sigma, q, steps))
    tight = prv.get_epsilon(delta)
    rdp = epsilon(sigma, q, steps, delta)
    assert 0.98 * tight <= rdp <= 1.5 * tight, (tight, rdp)


def test_accountant_state_composes_over_calls_and_matches_epsilon():
    x, y = data(40)
    cfg = TrainConfig(epochs=1, batch_size=8, seed=3)
    m, accountant = model(), RDPAccountant()
    _, s1 = train_local_dp(m, x, y, cfg, noise_multiplier=1.2, max_grad_norm=1.0,
                           accountant_state=accountant, private_seed=1)
    _, s2 = train_local_dp(m, x, y, cfg, noise_multiplier=1.2, max_grad_norm=1.0, epoch_offset=1,
                           accountant_state=accountant, private_seed=1)
    assert s1 == s2 == 5  # ceil(40 / 8): as many steps as plain training
    assert sum(k for _, _, k in accountant.history) == s1 + s2
    expected = epsilon(1.2, sample_rate(40, 8), s1 + s2, 1e-5)
    assert accountant.get_epsilon(1e-5) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("kwargs, message", [
    (dict(noise_multiplier=-0.1, max_grad_norm=1.0), "noise_multiplier"),
    (dict(noise_multiplier=1.0, max_grad_norm=0.0), "max_grad_norm"),
    (dict(noise_multiplier=1.0, max_grad_norm=-1.0), "max_grad_norm"),
    (dict(noise_multiplier=float("nan"), max_grad_norm=1.0), "noise_multiplier"),
])
def test_training_refuses_bad_settings(kwargs, message):
    x, y = data(8)
    m = model()
    before = flat(m)
    with pytest.raises(ValueError, match=message):
        train_local_dp(m, x, y, TrainConfig(), **kwargs)
    np.testing.assert_array_equal(flat(m), before)


@pytest.mark.parametrize("args, message", [
    ((1.0, 0.1, 10, 0.0), "delta"), ((1.0, 0.1, 10, 1.0), "delta"), ((1.0, 0.1, 10, -1e-5), "delta"),
    ((-1.0, 0.1, 10, 1e-5), "noise_multiplier"), ((1.0, 0.0, 10, 1e-5), "sample_rate"),
    ((1.0, 0.1, -1, 1e-5), "steps"),
])
def test_epsilon_refuses_bad_settings(args, message):
    with pytest.raises(ValueError, match=message):
        epsilon(*args)


def test_empty_data_is_refused():
    with pytest.raises(ValueError, match="empty"):
        train_local_dp(model(), *data(0), TrainConfig(), noise_multiplier=1.0, max_grad_norm=1.0)


# ---------------------------------------------------------------- the step itself

def test_poisson_batches_have_the_accounted_rate():
    batches = poisson_batches(1000, 0.1, 300, np.random.default_rng(0))
    sizes = np.array([len(b) for b in batches])
    # Binomial(1000, 0.1) per batch: mean 100, sd 9.5; over 300 batches the mean has sd 0.55.
    assert abs(sizes.mean() - 100) < 3 and sizes.std() > 5
    inclusion = np.bincount(np.concatenate(batches), minlength=1000) / 300
    assert abs(inclusion.mean() - 0.1) < 0.01


def test_empty_poisson_draws_still_take_a_noisy_step():
    # q = 1/30: about a third of the draws are empty; each still counts (and noises) a step.
    x, y = data(30)
    m = model()
    before = flat(m)
    loss, steps = train_local_dp(m, x, y, TrainConfig(epochs=1, batch_size=1, momentum=0.0, seed=2),
                                 noise_multiplier=1.0, max_grad_norm=1.0, private_seed=0)
    rng, _ = _generators(TrainConfig(epochs=1, batch_size=1, seed=2), 0, 0)
    assert any(len(b) == 0 for b in poisson_batches(30, 1 / 30, 30, rng))
    assert steps == 30 and math.isfinite(loss) and np.isfinite(flat(m)).all()
    assert np.abs(flat(m) - before).max() > 0


def test_no_noise_no_clipping_full_batch_equals_plain_sgd():
    x, y = data(24)
    cfg = TrainConfig(epochs=3, lr=0.1, momentum=0.9, batch_size=64, seed=5)  # q = 1: the full batch
    plain, private = model(), model()
    train_local(plain, x, y, cfg)
    train_local_dp(private, x, y, cfg, noise_multiplier=0.0, max_grad_norm=1e9, private_seed=0)
    assert np.abs(flat(plain) - flat(model())).max() > 1e-2  # training moved the weights
    np.testing.assert_allclose(flat(private), flat(plain), atol=1e-5, rtol=0)


def test_subsampled_steps_use_poisson_batches_and_divide_by_the_expected_batch_size():
    # Oracle: replay the seeded Poisson draws by hand with plain autograd; the sum of the
    # batch's losses is divided by q*n (not the drawn size), which is what the accounting assumes.
    x, y = data(40)
    cfg = TrainConfig(epochs=2, lr=0.2, momentum=0.0, batch_size=8, seed=4)
    private = model()
    train_local_dp(private, x, y, cfg, noise_multiplier=0.0, max_grad_norm=1e9, epoch_offset=3, private_seed=9)
    replay, q = model(), sample_rate(40, 8)
    sizes = []
    for e in range(cfg.epochs):
        rng, _ = _generators(cfg, 3 + e, 9)
        for idx in poisson_batches(40, q, steps_per_epoch(40, 8), rng):
            sizes.append(len(idx))
            replay.zero_grad()
            idx = torch.from_numpy(idx)
            loss = torch.nn.functional.cross_entropy(replay(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]),
                                                     reduction="sum") / (q * 40)
            loss.backward()
            with torch.no_grad():
                for p in replay.parameters():
                    p -= cfg.lr * p.grad
    assert len(set(sizes)) > 1  # the draws really vary in size
    np.testing.assert_allclose(flat(private), flat(replay), atol=1e-5, rtol=0)


def _outlier_contribution(clip: float) -> float:
    """||(n+1) * update(D + outlier) - n * update(D)|| = lr * ||clipped gradient of the outlier||."""
    x, y = data(12)
    outlier_x = 1e3 * np.ones((1, *SHAPE), np.float32)
    cfg = TrainConfig(epochs=1, lr=1.0, momentum=0.0, batch_size=64, seed=0)  # q = 1, one step
    start = flat(model())
    updates = []
    for xs, ys in ((x, y), (np.concatenate([x, outlier_x]), np.concatenate([y, [3]]))):
        m = model()
        train_local_dp(m, xs, ys, cfg, noise_multiplier=0.0, max_grad_norm=clip, private_seed=0)
        updates.append(len(xs) * (flat(m) - start))
    return float(np.linalg.norm(updates[1] - updates[0]))


def test_clipping_bounds_one_examples_contribution():
    clip = 0.5
    contribution = _outlier_contribution(clip)
    # The outlier's raw gradient is huge, so it is clipped to exactly the bound (up to float error).
    assert clip * 0.99 <= contribution <= clip * (1 + 1e-3), contribution


def test_without_clipping_the_outlier_dominates():
    # Control: the same measurement with clipping effectively off is far above the bound.
    assert _outlier_contribution(1e12) > 100 * 0.5


def test_noise_is_added_and_reproducible_given_the_seeds():
    x, y = data(40)
    cfg = TrainConfig(epochs=2, batch_size=8, seed=7)
    runs = {}
    for key, noise, seed in (("a", 1.0, 11), ("a_again", 1.0, 11), ("b", 1.0, 12), ("quiet", 0.0, 11)):
        m = model()
        loss, _ = train_local_dp(m, x, y, cfg, noise_multiplier=noise, max_grad_norm=1.0, private_seed=seed)
        runs[key] = flat(m)
        assert math.isfinite(loss)
    np.testing.assert_array_equal(runs["a"], runs["a_again"])
    assert np.abs(runs["a"] - runs["b"]).max() > 1e-3
    assert np.abs(runs["a"] - runs["quiet"]).max() > 1e-3
    # Without a private seed each call draws fresh entropy: not replayable from cfg.seed.
    m1, m2 = model(), model()
    for m in (m1, m2):
        train_local_dp(m, x, y, cfg, noise_multiplier=1.0, max_grad_norm=1.0)
    assert np.abs(flat(m1) - flat(m2)).max() > 1e-3


# ---------------------------------------------------------------- the model after DP training

def _hooks(m) -> int:
    return sum(len(getattr(mod, h)) for mod in m.modules()
               for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_model_is_plain_after_two_calls_in_a_row(name):
    x, y = data(24)
    cfg = TrainConfig(epochs=1, batch_size=8, seed=1)
    m = model(name)
    names = [n for n, _ in parameters_to_arrays(m)]
    hooks = _hooks(m)
    snapshots = [flat(m)]
    for round_ in range(2):
        train_local_dp(m, x, y, cfg, noise_multiplier=1.0, max_grad_norm=1.0,
                       epoch_offset=round_, private_seed=0)
        assert [n for n, _ in parameters_to_arrays(m)] == names
        assert [n for n, _ in m.named_parameters()] == [n for n in names]
        assert _hooks(m) == hooks
        for p in m.parameters():
            assert p.grad is None
            assert not any(hasattr(p, a) for a in ("grad_sample", "summed_grad", "_forward_counter"))
        snapshots.append(flat(m))
    assert np.abs(snapshots[1] - snapshots[0]).max() > 0 and np.abs(snapshots[2] - snapshots[1]).max() > 0
    # The exported weights load back, and plain training on the same object still works.
    copy = model(name)
    load_arrays(copy, parameters_to_arrays(m))
    np.testing.assert_array_equal(flat(copy), flat(m))
    before = flat(m)
    train_local(m, x, y, cfg)
    assert np.isfinite(flat(m)).all() and np.abs(flat(m) - before).max() > 0
    with torch.no_grad():
        assert m(torch.from_numpy(x)).shape == (24, 10)


def test_dp_sgd_fedavg_run_over_grpc_reports_each_clients_epsilon(tmp_path):
    """`securecollab train --dp-noise`: the plan carries DP-SGD to the client processes, which report epsilon."""
    import json
    import subprocess
    import sys

    from securecollab.plans import FedAvgPlan, client_data

    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "securecollab", "train", "--protocol", "fedavg", "--clients", "2",
                          "--rounds", "2", "--local-epochs", "1", "--dp-noise", "1.0", "--dp-clip", "1.0",
                          "--out", str(out)], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-2000:]
    plan = FedAvgPlan.from_json((out / "plan.json").read_text())
    assert plan.dp_noise_multiplier == 1.0
    for i in range(2):
        got = json.loads((out / f"result_client-{i}.json").read_text())
        n = len(client_data(plan, i)[1])
        assert got["num_examples"] == n
        assert got["epsilon"] == plan.dp_epsilon(n) and 0 < got["epsilon"] < 50
