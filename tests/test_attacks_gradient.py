"""Gradient-leakage attacks on plain FedAvg updates, and the metrics that score them.

Updates are produced by the project's own client code (``local_update``) on
the embedded digits, exactly as a client would send them; the attacks see
only the global weights, the update and the plan.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks import metrics
from attacks.analytic_fc import analytic_fc_attack, recover_fc_input
from attacks.gradient_inversion import InversionConfig, invert_gradient, invert_update, simulate_update
from attacks.knowledge import LocalTraining, local_training_from_plan
from attacks.labels import expected_probabilities, infer_label, infer_labels
from attacks.observed import client_updates, global_params_at, gradient_from_update, parameter_delta
from securecollab.data import load_dataset
from securecollab.models import build_model, load_arrays, parameters_to_arrays
from securecollab.plans import FedAvgPlan
from securecollab.protocols.fedavg import local_update
from securecollab.transcript import Kind, TranscriptRecorder, load_transcript

ONE_STEP = FedAvgPlan(local_epochs=1)  # one client, one image, one SGD step
MARGIN_DB = 1.0  # how far above the blind baseline a control may land


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def global_params(digits):
    # Round 0: the aggregator's freshly initialised model, as it sends it.
    return parameters_to_arrays(build_model("mlp", digits.input_shape, digits.num_classes, seed=0))


def architecture(digits):
    return build_model("mlp", digits.input_shape, digits.num_classes, seed=123)  # weights never used


def client_update(digits, plan, global_params, x, y, index=0):
    model = build_model(plan.model, digits.input_shape, digits.num_classes, seed=plan.seed)
    return local_update(model, plan, 0, global_params, x, y, index)


def one_step(plan: FedAvgPlan) -> LocalTraining:
    return LocalTraining(lr=plan.lr, momentum=plan.momentum)


def mean_aggregate(updates):
    """What secure aggregation reveals for equally weighted clients: the mean of their new weights."""
    names = [name for name, _ in updates[0]]
    return [(name, np.mean([dict(u)[name].astype(np.float64) for u in updates], 0).astype(np.float32))
            for name in names]


# --- analytic recovery --------------------------------------------------------------------------

@pytest.mark.parametrize("local_epochs", [1, 3])
def test_analytic_fc_recovers_a_single_image_to_float_precision(digits, global_params, local_epochs):
    # With one image every local step adds a multiple of x to each first-layer row, so even
    # several momentum steps leave the recovery exact.
    plan = FedAvgPlan(local_epochs=local_epochs)
    for i in range(5):
        x, y = digits.x_test[i:i + 1], digits.y_test[i:i + 1]
        new = client_update(digits, plan, global_params, x, y)
        guess = analytic_fc_attack(architecture(digits), global_params, new, digits.input_shape)
        assert np.abs(guess - x[0]).max() < 1e-5


def test_analytic_fc_ratio_is_blind_to_learning_rate_and_sign():
    rng = np.random.default_rng(0)
    x, db = rng.random(64), rng.normal(size=16)
    grad_w = np.outer(db, x)
    assert np.allclose(recover_fc_input(-0.37 * grad_w, -0.37 * db), x, atol=1e-12)


def test_analytic_fc_fails_on_two_images_and_refuses_a_conv_first_layer(digits, global_params):
    # Two images mix in every row: the ratio no longer isolates either (the attack's stated limit).
    x, y = digits.x_test[:2], digits.y_test[:2]
    new = client_update(digits, ONE_STEP, global_params, x, y)
    guess = analytic_fc_attack(architecture(digits), global_params, new, digits.input_shape)
    assert min(np.abs(guess - x[0]).max(), np.abs(guess - x[1]).max()) > 0.05
    convnet = build_model("convnet", digits.input_shape, digits.num_classes, seed=0)
    with pytest.raises(ValueError, match="not the model's first layer"):
        analytic_fc_attack(convnet, parameters_to_arrays(convnet), parameters_to_arrays(convnet),
                           digits.input_shape)


# --- labels -------------------------------------------------------------------------------------

def test_label_recovery_from_a_single_image_update(digits, global_params):
    model = architecture(digits)
    for i in range(30):
        x, y = digits.x_test[i:i + 1], digits.y_test[i:i + 1]
        new = client_update(digits, ONE_STEP, global_params, x, y)
        assert infer_label(gradient_from_update(global_params, new, one_step(ONE_STEP), 1), model) == y[0]


def test_label_multiset_recovery_from_an_aggregate_of_eight(digits, global_params):
    idx = np.arange(8) * 7
    x, y = digits.x_test[idx], digits.y_test[idx]
    aggregate = mean_aggregate([client_update(digits, ONE_STEP, global_params, x[j:j + 1], y[j:j + 1], j)
                                for j in range(8)])
    model = architecture(digits)
    load_arrays(model, global_params)
    probs = expected_probabilities(model, digits.x_train[:300])
    implied = gradient_from_update(global_params, aggregate, one_step(ONE_STEP), 8)
    assert sorted(infer_labels(implied, model, 8, probs)) == sorted(y)


# --- optimization-based inversion ---------------------------------------------------------------

@pytest.fixture(scope="module")
def single_image_inversions(digits, global_params):
    out = []
    for i in (0, 1, 2):
        x, y = digits.x_test[i:i + 1], digits.y_test[i:i + 1]
        new = client_update(digits, ONE_STEP, global_params, x, y)
        inv = invert_update(architecture(digits), global_params, new, 1, digits.input_shape, digits.num_classes,
                            one_step(ONE_STEP), config=InversionConfig(seed=i))
        out.append((x[0], y[0], inv))
    return out


def test_gradient_inversion_recovers_single_images_and_labels(single_image_inversions):
    for x, y, inv in single_image_inversions:
        assert metrics.psnr_db(inv.images[0], x) >= 25.0
        assert inv.labels[0] == y


def test_good_reconstructions_beat_both_blind_baselines(digits, single_image_inversions):
    originals = np.stack([x for x, _, _ in single_image_inversions])
    recons = np.concatenate([inv.images for _, _, inv in single_image_inversions])
    labels = np.array([inv.labels[0] for _, _, inv in single_image_inversions])
    true = np.array([y for _, y, _ in single_image_inversions])
    pool = digits.x_test  # the originals sit at indices 0, 1, 2
    scored = metrics.score_with_baselines(recons, originals, digits.x_train, predicted_labels=labels,
                                          true_labels=true, num_classes=10, pool=pool,
                                          source_indices=[0, 1, 2])
    attack, baseline, random = scored["metrics"], scored["baseline"], scored["random"]
    assert attack["psnr_db"] > baseline["psnr_db"] + 10 and baseline["psnr_db"] > random["psnr_db"]
    assert attack["ssim"] > baseline["ssim"] and attack["mse"] < baseline["mse"]
    assert attack["reid_rate"] == 1.0 and baseline["reid_rate"] == 0.0
    assert attack["label_accuracy"] == 1.0 and attack["label_accuracy_ci"][0] > 0.2


def test_inversion_from_a_plain_gradient(digits, global_params):
    # FedSGD clients that send gradients instead of weights: the same attack, no update arithmetic.
    x, y = digits.x_test[6:7], digits.y_test[6:7]
    model = build_model("mlp", digits.input_shape, digits.num_classes, seed=0)
    load_arrays(model, global_params)
    loss = torch.nn.functional.cross_entropy(model(torch.tensor(x)), torch.tensor(y))
    gradient = {name: g.numpy() for (name, _), g in
                zip(model.named_parameters(), torch.autograd.grad(loss, list(model.parameters())))}
    inv = invert_gradient(architecture(digits), global_params, gradient, 1, digits.input_shape, digits.num_classes)
    assert inv.labels[0] == y[0]
    assert metrics.psnr_db(inv.images[0], x[0]) >= 25.0


def test_soft_labels_when_not_read_from_the_bias(digits, global_params):
    x, y = digits.x_test[7:8], digits.y_test[7:8]
    new = client_update(digits, ONE_STEP, global_params, x, y)
    inv = invert_update(architecture(digits), global_params, new, 1, digits.input_shape, digits.num_classes,
                        one_step(ONE_STEP), config=InversionConfig(labels="soft", seed=0))
    assert inv.labels[0] == y[0]
    assert metrics.psnr_db(inv.images[0], x[0]) >= 25.0


def test_fedsgd_aggregate_of_two_images_is_inverted_jointly(digits, global_params):
    idx = np.array([0, 1])
    x, y = digits.x_test[idx], digits.y_test[idx]
    aggregate = mean_aggregate([client_update(digits, ONE_STEP, global_params, x[j:j + 1], y[j:j + 1], j)
                                for j in range(2)])
    inv = invert_update(architecture(digits), global_params, aggregate, 2, digits.input_shape,
                        digits.num_classes, one_step(ONE_STEP), auxiliary_images=digits.x_train[:300],
                        config=InversionConfig(seed=0))
    scored = metrics.score_reconstructions(inv.images, x, predicted_labels=inv.labels, true_labels=y)
    assert scored["psnr_db"] >= 25.0
    assert scored["label_accuracy"] == 1.0


def test_unrolling_several_local_steps_beats_the_one_gradient_approximation(digits, global_params):
    # FedAvg regime: four momentum steps on one image. Replaying them recovers the image; reading the
    # update as one gradient at the global weights does not.
    plan = FedAvgPlan(local_epochs=4)
    x, y = digits.x_test[8:9], digits.y_test[8:9]
    new = client_update(digits, plan, global_params, x, y)
    psnr = {}
    for regime in ("unroll", "gradient"):
        inv = invert_update(architecture(digits), global_params, new, 1, digits.input_shape, digits.num_classes,
                            local_training_from_plan(plan, 0, 0), config=InversionConfig(regime=regime, seed=0))
        assert inv.labels[0] == y[0]
        psnr[regime] = metrics.psnr_db(inv.images[0], x[0])
    assert psnr["unroll"] >= 25.0
    assert psnr["unroll"] > psnr["gradient"] + 5.0


def test_simulated_local_training_reproduces_the_clients_update(digits, global_params):
    # The unroll regime is only as good as its replay of the client: it must match local_update.
    plan = FedAvgPlan(local_epochs=2, batch_size=3)
    x, y = digits.x_test[:7], digits.y_test[:7]
    new = client_update(digits, plan, global_params, x, y, index=1)
    model = architecture(digits)
    params = {name: torch.tensor(a) for name, a in global_params}
    delta = simulate_update(model, params, torch.tensor(x), torch.tensor(y), local_training_from_plan(plan, 1, 0))
    observed = parameter_delta(global_params, new)
    for name, d in delta.items():
        assert np.abs(d.detach().numpy() - observed[name]).max() < 1e-5


# --- the control: no information, no reconstruction ---------------------------------------------

def test_control_unrelated_or_random_updates_score_at_baseline(digits, global_params):
    targets = digits.x_test[20:23]
    baseline = metrics.score_reconstructions(metrics.mean_image_baseline(digits.x_train, 3), targets, match=False)
    rng = np.random.default_rng(0)
    random_update = [(name, a + rng.normal(scale=1e-3, size=a.shape).astype(np.float32))
                     for name, a in global_params]
    decoys = {
        # another client's image, not the target's
        "unrelated": [client_update(digits, ONE_STEP, global_params, digits.x_test[40 + k:41 + k],
                                    digits.y_test[40 + k:41 + k]) for k in range(3)],
        "random": [random_update] * 3,
    }
    for name, updates in decoys.items():
        recons = np.concatenate([
            invert_update(architecture(digits), global_params, u, 1, digits.input_shape, digits.num_classes,
                          one_step(ONE_STEP), config=InversionConfig(iterations=150, seed=k)).images
            for k, u in enumerate(updates)])
        scored = metrics.score_reconstructions(recons, targets, match=False)
        assert scored["psnr_db"] <= baseline["psnr_db"] + MARGIN_DB, name


# --- metrics ------------------------------------------------------------------------------------

def test_metrics_of_identical_and_known_images():
    rng = np.random.default_rng(1)
    img = rng.random((1, 8, 8)).astype(np.float32)
    assert metrics.mse(img, img) == 0.0
    assert metrics.psnr_db(img, img) == metrics.PSNR_CAP_DB
    assert metrics.ssim(img, img) == pytest.approx(1.0)
    assert metrics.psnr_db(img + 0.1, img) == pytest.approx(20.0, abs=1e-4)  # mse 0.01 on a unit range
    assert metrics.psnr_db(img * 16 + 1.6, img * 16, data_range=16.0) == pytest.approx(20.0, abs=1e-4)
    assert metrics.ssim(np.clip(img + rng.normal(0, 0.3, img.shape), 0, 1), img) < 0.9


def test_hungarian_matching_undoes_a_permutation():
    rng = np.random.default_rng(2)
    originals = rng.random((6, 1, 8, 8))
    perm = rng.permutation(6)
    recons = originals[perm] + rng.normal(0, 0.02, originals.shape)
    order = metrics.match_reconstructions(recons, originals)
    assert np.array_equal(perm[order], np.arange(6))
    matched = metrics.score_reconstructions(recons, originals)
    unmatched = metrics.score_reconstructions(recons, originals, match=False)
    assert matched["psnr_db"] > 30 > unmatched["psnr_db"]


def test_reidentification_against_a_pool():
    rng = np.random.default_rng(3)
    pool = rng.random((20, 1, 8, 8))
    sources = np.array([4, 9, 13])
    assert metrics.reid_rate(pool[sources] + 0.01, sources, pool) == 1.0
    assert metrics.reid_rate(metrics.mean_image_baseline(pool, 3), sources, pool) <= 1 / 3


def test_rate_confidence_intervals():
    low, high = metrics.rate_ci(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # Wilson, 95%
    cp = metrics.rate_ci(5, 10, method="clopper_pearson")
    assert cp == pytest.approx((0.1871, 0.8129), abs=1e-4)
    assert metrics.rate_ci(50, 50)[1] == 1.0 and metrics.rate_ci(50, 50)[0] > 0.9
    assert metrics.rate_ci(0, 50, method="clopper_pearson") == pytest.approx((0.0, 0.0711), abs=1e-4)


def test_labels_and_multisets():
    assert metrics.label_accuracy([1, 2, 3], [1, 2, 4]) == pytest.approx(2 / 3)
    assert metrics.multiset_label_accuracy([3, 1, 2], [1, 2, 4], 10) == pytest.approx(2 / 3)


# --- the adversary's view: the aggregator's transcript ------------------------------------------

def test_attack_reads_the_update_from_the_aggregators_transcript(tmp_path, digits, global_params):
    x, y = digits.x_test[5:6], digits.y_test[5:6]
    new = client_update(digits, ONE_STEP, global_params, x, y)
    recorder = TranscriptRecorder(tmp_path / "aggregator.jsonl", party="aggregator", role="aggregator")
    recorder.record(Kind.UPDATE, round=0, sender="client-0", meta={"num_examples": 1}, tensors=new)
    transcript = load_transcript(tmp_path / "aggregator.jsonl")
    num_examples, observed = client_updates(transcript, 0)["client-0"]
    assert num_examples == 1
    guess = analytic_fc_attack(architecture(digits), global_params, observed, digits.input_shape)
    assert np.abs(guess - x[0]).max() < 1e-5
    # the aggregator can also replay the next round's global model from what it received
    replayed = global_params_at(global_params, transcript, 1)
    assert all(np.array_equal(replayed[name], a) for name, a in new)
