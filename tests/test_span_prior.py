"""Reconstruction on the first layer's input plane with the adversary's priors (attacks/span_prior.py).

Updates are the protocol's own: local_update in the FedAvg regime (32 images, 4 steps of 8, momentum 0.9).
"""

import numpy as np
import pytest

from attacks.input_plane import input_plane
from attacks.metrics import match_reconstructions, mean_image_baseline, per_image_scores
from attacks.span_prior import PRIORS, span_prior_inversion
from experiments.gradient_inversion import fedavg_plan
from securecollab.models import build_model, parameters_to_arrays
from securecollab.plans import client_data
from securecollab.protocols.fedavg import local_update

PLAN = fedavg_plan(2, 1, seed=0)


@pytest.fixture(scope="module")
def ds():
    return PLAN.load_data()


def update(ds, images, labels):
    """(global weights, a client's new weights) after its local training on (images, labels)."""
    start = parameters_to_arrays(PLAN.build_model(ds))
    return dict(start), dict(local_update(PLAN.build_model(ds), PLAN, 0, start, images, labels, 0))


def median_psnr(images, originals) -> float:
    order = match_reconstructions(images, originals)
    return float(np.median(per_image_scores(images[order], originals)["psnr_db"]))


def test_every_input_lies_on_the_plane_after_several_momentum_steps(ds):
    _, x, y = client_data(PLAN, 0)
    start, new = update(ds, x, y)
    plane = input_plane(new["1.weight"] - start["1.weight"], new["1.bias"] - start["1.bias"], len(x))
    flat = x.reshape(len(x), -1).astype(np.float64)
    assert plane.directions.shape == (31, 64)
    assert np.abs(plane.project(flat) - flat).max() < 1e-3
    # the test split's images are not on it
    aux = ds.x_test.reshape(len(ds.x_test), -1).astype(np.float64)
    assert np.median(np.abs(plane.project(aux) - aux).max(1)) > 0.2


@pytest.mark.parametrize("prior, gain_db", [("auxiliary_span", 2.5), ("learned_latent", 3.0), ("local_gaussian", 4.0)])
def test_a_prior_on_the_plane_recovers_a_fedavg_clients_images(ds, prior, gain_db):
    _, x, y = client_data(PLAN, 0)
    start, new = update(ds, x, y)
    found = span_prior_inversion(PLAN.build_model(ds), start, new, len(x), ds, prior)
    baseline = median_psnr(mean_image_baseline(ds.x_test, len(x)), x)
    assert median_psnr(found.images, x) > baseline + gain_db
    order = match_reconstructions(found.images, x)
    assert (found.labels[order] == y).mean() > 0.5


@pytest.mark.parametrize("prior", PRIORS)
def test_control_an_update_of_random_images_gives_nothing_of_the_victims(ds, prior):
    """The prior alone does not invent the victim's digits: from the update of noise images with random
    labels, the reconstructions are no closer to the victim's images than the mean image is."""
    _, x, _ = client_data(PLAN, 0)
    rng = np.random.default_rng(0)
    start, new = update(ds, rng.random(x.shape).astype(np.float32), rng.integers(0, 10, len(x)))
    found = span_prior_inversion(PLAN.build_model(ds), start, new, len(x), ds, prior)
    assert median_psnr(found.images, x) < median_psnr(mean_image_baseline(ds.x_test, len(x)), x)


@pytest.mark.parametrize("prior", PRIORS)
def test_control_auxiliary_images_of_other_classes_only_fall_to_the_baseline(ds, prior):
    """A victim with digits 0-4, an adversary whose own images are 5-9: within 1.5 dB of the mean image."""
    victim = np.where(ds.y_train < 5)[0][:32]
    x, y = ds.x_train[victim], ds.y_train[victim]
    others = (ds.x_test[ds.y_test >= 5], ds.y_test[ds.y_test >= 5])
    start, new = update(ds, x, y)
    found = span_prior_inversion(PLAN.build_model(ds), start, new, len(x), ds, prior, auxiliary=others)
    assert median_psnr(found.images, x) < median_psnr(mean_image_baseline(others[0], len(x)), x) + 1.5
    assert not np.isin(found.labels, y).any()  # its labels come from its own images


def test_no_plane_for_a_conv_first_model_or_as_many_inputs_as_pixels(ds):
    conv = build_model("cnn", ds.input_shape, ds.num_classes, seed=0)
    weights = dict(parameters_to_arrays(conv))
    assert span_prior_inversion(conv, weights, weights, 8, ds, "auxiliary_span") is None
    assert input_plane(np.eye(64), np.ones(64), 64) is None
    assert input_plane(np.zeros((64, 64)), np.zeros(64), 8) is None


def test_an_auxiliary_set_smaller_than_the_batch_is_refused_clearly(ds):
    _, x, y = client_data(PLAN, 0)
    start, new = update(ds, x, y)
    with pytest.raises(ValueError, match="has 10 images, fewer than the 32 inputs"):
        span_prior_inversion(PLAN.build_model(ds), start, new, len(x), ds, "auxiliary_span",
                             auxiliary=(ds.x_test[:10], ds.y_test[:10]))
