"""Specification of the aggregation rules in the clear (their MPC forms are checked in test_mpc.py)."""

import numpy as np
import pytest

from securecollab.aggregation import RULES, AggregationRule, register_rule, rule, secure_rule
from securecollab.updates import apply_aggregate, update_vector


def test_the_rules_register_themselves():
    rule("mean")  # discovers the package
    assert {"mean", "norm_bound", "dp_noise"} <= set(RULES)
    with pytest.raises(ValueError, match="unknown aggregation rule"):
        rule("median-of-nothing")


def test_mean_is_fedavg_weighted_by_examples():
    g = [("w", np.zeros(2, np.float32))]
    clients = [[("w", np.array([1.0, 2.0], np.float32))], [("w", np.array([5.0, 6.0], np.float32))]]
    vectors = [update_vector(p, g) for p in clients]
    total = rule("mean").clear(vectors, np.array([1.0, 3.0]))
    assert total[-1] == 4.0  # the counting entry carries the total weight
    np.testing.assert_allclose(dict(apply_aggregate(g, total))["w"], [4.0, 5.0])  # (1*1 + 3*5) / 4, ...


def test_norm_bound_drops_updates_over_the_bound_in_the_clear():
    u = [np.array([0.6, 0.0, 1.0]), np.array([3.0, 4.0, 1.0]), np.array([0.0, 0.5, 1.0])]
    total = secure_rule(norm_bound=2.0).clear(u, np.ones(3))
    np.testing.assert_allclose(total, u[0] + u[2])  # norm 5.1 is rejected; the count says 2


def test_noise_wraps_another_rule():
    u = [np.zeros(20000), np.zeros(20000)]
    noisy = secure_rule(dp_sigma=0.5).clear(u, np.ones(2))
    assert abs(noisy.std() / 0.5 - 1) < 0.05
    assert secure_rule(norm_bound=1.0, dp_sigma=0.5).needs_dealer


def test_a_new_rule_is_one_class_and_its_registration():
    @register_rule("first_only")
    class FirstOnly(AggregationRule):
        def clear(self, updates, weights):
            return weights[0] * updates[0]

        def in_mpc(self, x):
            return x[0]

    try:
        assert rule("first_only").clear([np.ones(2), 5 * np.ones(2)], np.array([2.0, 1.0])).tolist() == [2.0, 2.0]
    finally:
        del RULES["first_only"]


def test_clip_scales_updates_over_the_bound_and_keeps_their_count():
    u = [np.array([0.6, 0.0, 1.0]), np.array([1.8, 1.8, 1.0]), np.array([0.0, 0.0, 1.0])]
    total = secure_rule(norm_bound=2.0, norm_mode="clip").clear(u, np.ones(3))
    r = np.sqrt(2)  # (1.8, 1.8) clipped to norm 2; a zero delta counts
    np.testing.assert_allclose(total, [0.6 + r, r, 3.0])
    # a coordinate at or over the coordinate bound (here 4, the power of two above the bound) is refused, not
    # clipped; one just under it is clipped and counted
    clip = secure_rule(norm_bound=2.0, norm_mode="clip")
    assert clip.clear([np.array([4.0, 0.0, 1.0])], np.ones(1))[-1] == 0
    np.testing.assert_allclose(clip.clear([np.array([3.99, 0.0, 1.0])], np.ones(1)), [2.0, 0.0, 1.0])


def test_fltrust_weighs_by_cosine_to_the_root_update_and_normalises_norms():
    g0 = np.array([2.0, 0.0])
    u = [np.array([1.0, 1.0, 1.0]),      # cos 1/sqrt(2)
         np.array([-3.0, 0.1, 1.0]),     # points away: no trust
         np.array([300.0, 0.0, 1.0]),    # boosted, aligned: trust 1, normalised to ||g0||
         np.array([1.0, 0.0, 5.0])]      # counts itself 5 times: not well formed, no weight
    fltrust = rule("fltrust", reference=g0)
    assert fltrust.real_weights
    total = fltrust.clear(u, np.array([10.0, 10.0, 10.0, 10.0]))  # example counts do not matter to FLTrust
    c = 1 / np.sqrt(2)
    np.testing.assert_allclose(total, [c * np.sqrt(2) + 2.0, c * np.sqrt(2), c + 1.0])
    g = [("w", np.zeros(2, np.float32))]
    step = dict(apply_aggregate(g, total, real_weights=True))["w"]
    assert np.linalg.norm(step) <= 2.0 and step[0] > step[1] > 0
    with pytest.raises(ValueError, match="coordinates"):
        fltrust.clear([np.ones(4)], np.ones(1))
    with pytest.raises(ValueError, match="norm"):
        rule("fltrust", reference=np.full(2, 1e-6)).clear(u, np.ones(4))


def test_a_total_weight_rounds_only_when_it_counts_clients():
    g = [("w", np.zeros(1, np.float32))]
    assert dict(apply_aggregate(g, np.array([3.0, 2.9999])))["w"] == pytest.approx(1.0)  # fixed point: 3 clients
    assert dict(apply_aggregate(g, np.array([0.5, 0.25]), real_weights=True))["w"] == pytest.approx(2.0)
    with pytest.raises(Exception, match="no update was accepted"):
        apply_aggregate(g, np.array([0.0, 0.0]), real_weights=True)
