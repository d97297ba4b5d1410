"""Separating an aggregate of N one-image FedSGD updates into the N images (attacks/separation.py).

The aggregate is built as the coordinator receives it: real client updates (the protocol's own
local_update), each rounded to the fixed-point grid the compute parties share, summed, plus the count.
"""

import numpy as np
import pytest

from attacks.fl_inversion import images_used, invert_aggregate
from attacks.gradient_inversion import InversionConfig
from attacks.metrics import match_reconstructions, per_image_scores
from attacks.observed import parameter_delta
from attacks.separation import relu_pair, separate, separated_or, step_residual
from experiments.gradient_inversion import fedsgd_plan
from securecollab.data import load_dataset
from securecollab.models import build_model, parameters_to_arrays
from securecollab.plans import client_data
from securecollab.protocols.fedavg import local_update
from securecollab.updates import apply_aggregate

SCALE = 2.0 ** 16  # the fixed-point grid of secure aggregation's shares


def revealed(n: int, seed: int = 0):
    """(plan, data set, global weights, aggregate as revealed, training indices of the images behind it)."""
    plan = fedsgd_plan(n, 1, seed=seed)
    ds = load_dataset(plan.dataset, seed=plan.seed)
    start = parameters_to_arrays(plan.build_model(ds))
    total = 0
    for i in range(n):
        _, x, y = client_data(plan, i)
        new = local_update(plan.build_model(ds), plan, 0, start, x, y, i)
        delta = np.concatenate([(a - g).ravel() for (_, a), (_, g) in zip(new, start)])
        total = total + np.round(delta * SCALE) / SCALE
    truth = np.concatenate([images_used(plan, i, 0) for i in range(n)])
    return plan, ds, start, np.append(total, n).astype(np.float64), truth


def scores(images, truth_images):
    order = match_reconstructions(images, truth_images)
    return order, per_image_scores(images[order], truth_images)["psnr_db"]


def test_an_aggregate_of_eight_is_separated_into_its_images_and_labels():
    plan, ds, start, aggregate, truth = revealed(8)
    model = plan.build_model(ds)
    step = parameter_delta(start, apply_aggregate(start, aggregate))
    found = separate(model, dict(start), step, 8, plan.lr / 8, ds.input_shape, ds.num_classes, ds.x_test)
    order, psnr = scores(found.images, ds.x_train[truth])
    assert np.median(psnr) > 40 and (psnr > 30).sum() >= 7, psnr
    assert (found.labels[order] == ds.y_train[truth]).mean() >= 7 / 8
    # the adversary's own yardstick: the truth explains the step to the fixed-point noise, random images do not
    assert step_residual(model, dict(start), step, plan.lr / 8, ds.x_train[truth], ds.y_train[truth]) < 0.01
    noise = np.random.default_rng(0).random((8, *ds.input_shape)).astype(np.float32)
    assert step_residual(model, dict(start), step, plan.lr / 8, noise, ds.y_train[truth]) > 0.5


def test_the_coordinators_attack_keeps_the_separation_when_it_explains_the_aggregate_better():
    plan, ds, start, aggregate, truth = revealed(4, seed=1)
    model = plan.build_model(ds)
    config = InversionConfig(iterations=40)
    alone = invert_aggregate(model, dict(start), aggregate, [f"client-{i}" for i in range(4)], plan, 0, ds, config,
                             separation=False)
    best = separated_or(alone, model, dict(start), dict(apply_aggregate(start, aggregate)), 4, plan.lr / 4, ds)
    assert alone.method == "optimization" and best.method == "hidden_span"
    originals = ds.x_train[truth]
    assert np.median(scores(best.images, originals)[1]) > np.median(scores(alone.images, originals)[1]) + 10


def test_control_a_random_aggregate_is_not_separated_into_anyones_images():
    plan, ds, start, aggregate, truth = revealed(4)
    model = plan.build_model(ds)
    noise = np.append(np.random.default_rng(1).normal(0, 1e-3, len(aggregate) - 1), 4.0)
    step = parameter_delta(start, apply_aggregate(start, noise))
    found = separate(model, dict(start), step, 4, plan.lr / 4, ds.input_shape, ds.num_classes, ds.x_test)
    assert found.residual > 0.5  # nothing explains it
    assert np.median(scores(found.images, ds.x_train[truth])[1]) < 16


@pytest.mark.parametrize("name", ["convnet", "cnn", "linear"])
def test_models_without_linear_relu_linear_at_the_input_are_left_to_the_optimizer(name):
    ds = load_dataset("digits", seed=0)
    model = build_model(name, ds.input_shape, ds.num_classes)
    assert relu_pair(model) is None
    zeros = {k: np.zeros_like(v) for k, v in parameters_to_arrays(model)}
    assert separate(model, dict(parameters_to_arrays(model)), zeros, 2, 0.1, ds.input_shape, ds.num_classes,
                    ds.x_test) is None


def test_the_adversarys_images_only_start_the_search_digits_of_other_classes_do_as_well():
    """What the separation finds comes from the aggregate: started from auxiliary images of classes that none
    of the victims holds, it still returns the victims' digits (and their labels, which it never saw)."""
    plan, ds, start, aggregate, truth = revealed(4, seed=2)
    model = plan.build_model(ds)
    step = parameter_delta(start, apply_aggregate(start, aggregate))
    others = ds.x_test[~np.isin(ds.y_test, ds.y_train[truth])]
    found = separate(model, dict(start), step, 4, plan.lr / 4, ds.input_shape, ds.num_classes, others)
    order, psnr = scores(found.images, ds.x_train[truth])
    assert np.median(psnr) > 40, psnr
    assert (found.labels[order] == ds.y_train[truth]).all()
