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
