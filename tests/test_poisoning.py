"""Malicious clients (securecollab.poisoning), the aggregator's norm bound in the clear, and the backdoor
end to end through real processes: model replacement against plain FedAvg and against secure aggregation
with the sound in-MPC norm bound."""

from __future__ import annotations

import json

import numpy as np
import pytest

from securecollab.aggregation.norm_bound import clear_accepts, coordinate_bound
from securecollab.plans import FedAvgPlan, SecAggPlan
from securecollab.poisoning import BEHAVIOURS, Malice, add_trigger, behaviour, discover
from securecollab.poisoning.wraparound import WRAP, wraparound_vector


def test_every_behaviour_registers_and_malice_round_trips_as_json():
    discover()
    assert {"sign_flip", "scale", "random", "backdoor", "model_replacement", "adaptive", "wraparound"} <= set(BEHAVIOURS)
    m = Malice("model_replacement", factor=10, target=3, poison_fraction=0.25, from_round=9)
    assert Malice.from_json(m.to_json()) == m
    for bad in ({"behaviour": "teleport"}, {"behaviour": "backdoor", "poison_fraction": 1.5},
                {"behaviour": "scale", "factor": -1}):
        with pytest.raises(ValueError):
            Malice(**bad)
    with pytest.raises(TypeError):
        Malice.from_json(json.dumps({"behaviour": "scale", "pickle": True}))


def test_crafted_updates():
    rng = np.random.default_rng(0)
    delta = rng.normal(size=500)
    norm = np.linalg.norm(delta)
    np.testing.assert_allclose(behaviour(Malice("sign_flip"), 10).update(delta, rng), -10 * delta)
    np.testing.assert_allclose(behaviour(Malice("scale", factor=3), 10).update(delta, rng), 3 * delta)
    noise = behaviour(Malice("random"), 10).update(delta, rng)
    assert np.linalg.norm(noise) == pytest.approx(10 * norm) and abs(np.corrcoef(noise, delta)[0, 1]) < 0.2
    assert np.allclose(behaviour(Malice("model_replacement"), 10).update(delta, rng), 10 * delta)  # gamma = n
    adaptive = behaviour(Malice("adaptive", bound=2.0), 10).update(delta, rng)
    assert 1.95 < np.linalg.norm(adaptive) <= 2.0  # just inside the bound it knows
    small = delta / norm * 0.01
    np.testing.assert_allclose(behaviour(Malice("adaptive", bound=2.0), 10).update(small, rng), 10 * small)
    with pytest.raises(ValueError, match="bound"):
        behaviour(Malice("adaptive"), 10)
    wrap = wraparound_vector(delta)
    assert set(np.abs(wrap)) == {WRAP} and np.array_equal(np.sign(wrap), np.where(delta < 0, -1, 1))


def test_backdoor_poisons_the_given_fraction_with_the_trigger_and_the_target():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 0.5, size=(40, 1, 8, 8)).astype(np.float32)
    y = rng.integers(1, 10, size=40)
    px, py = behaviour(Malice("backdoor", target=0, poison_fraction=0.25), 10).data(x, y, rng)
    changed = (py != y)
    assert changed.sum() == 10 and (py[changed] == 0).all()
    np.testing.assert_array_equal(px[changed], add_trigger(x[changed]))
    np.testing.assert_array_equal(px[~changed], x[~changed])
    assert (px[changed][..., -3:, -3:].max() == 1.0) and add_trigger(x).shape == x.shape


def test_accept_rule_in_the_clear():
    d = 1000
    good = np.append(np.full(d, 0.9 / np.sqrt(d)), 1.0)
    assert clear_accepts(good, 1.0)
    assert not clear_accepts(np.append(good[:-1] * 1.2, 1.0), 1.0)
    assert not clear_accepts(np.append(good[:-1], 2.0), 1.0)  # counts itself twice
    wrap = np.append(wraparound_vector(good[:-1]), 1.0)
    assert not clear_accepts(wrap, 1.0)
    # without the range check, the norm in the clear still catches it (it is the ring that wraps, not floats)
    assert not clear_accepts(wrap, 1.0, range_check=False)
    # R: the power of two above the bound, capped so that D squares cannot wrap the ring
    assert coordinate_bound(1.0, d) == 2.0 and coordinate_bound(1000.0, 10**6) == 32.0
    assert 10**6 * (32.0 * 2**16) ** 2 < 2**63 <= 10**6 * (64.0 * 2**16) ** 2


def test_plain_aggregator_applies_its_plans_norm_bound():
    from securecollab.protocols.fedavg import FedAvgRounds
    g = [("w", np.zeros(4, np.float32))]
    plan = FedAvgPlan(num_clients=2, rounds=1, norm_bound=1.0)
    rounds = FedAvgRounds(plan, g)
    rounds.submit("client-0", 0, 10, [("w", np.array([0.5, 0, 0, 0], np.float32))])
    rounds.submit("client-1", 0, 10, [("w", np.array([50.0, 0, 0, 0], np.float32))])  # dropped in the clear
    np.testing.assert_allclose(dict(rounds.params)["w"], [0.5, 0, 0, 0])
    with pytest.raises(ValueError, match="inside MPC"):
        SecAggPlan(training=plan)


def test_a_plain_round_whose_every_update_is_rejected_ends_with_the_model_unchanged():
    """Nothing accepted must neither lose the acknowledged submissions' round nor leave their clients waiting."""
    from securecollab.protocols.fedavg import FedAvgRounds
    g = [("w", np.zeros(4, np.float32))]
    rounds = FedAvgRounds(FedAvgPlan(num_clients=2, rounds=2, norm_bound=1.0), g)
    assert rounds.submit("client-0", 0, 10, [("w", np.full(4, 5.0, np.float32))]) == 1
    assert rounds.submit("client-1", 0, 10, [("w", np.full(4, -5.0, np.float32))]) == 2
    assert rounds.round == 1 and rounds.empty_rounds == [0]
    np.testing.assert_array_equal(dict(rounds.params)["w"], 0.0)
    assert rounds.wait_for_round(1, timeout=1, client_id="client-0")[0] == 1  # handed out at once
    rounds.submit("client-0", 1, 10, [("w", np.full(4, 0.5, np.float32))])
    rounds.submit("client-1", 1, 10, [("w", np.full(4, 0.25, np.float32))])
    np.testing.assert_allclose(dict(rounds.params)["w"], 0.375)
    assert rounds.done and rounds.empty_rounds == [0]


def test_plain_aggregator_clips_or_weighs_by_trust_as_its_plan_says():
    from securecollab.protocols.fedavg import FedAvgRounds, RootUpdates
    ds = FedAvgPlan().load_data()
    plan = FedAvgPlan(num_clients=2, rounds=1, robust="fltrust", root_samples=50)
    model = plan.build_model(ds)
    from securecollab.models import parameters_to_arrays
    g = parameters_to_arrays(model)
    g0 = RootUpdates(plan).delta(0, g)
    assert np.linalg.norm(g0) > 0.1  # the root data moves the model
    rounds = FedAvgRounds(plan, g)
    flat = [0]
    def shifted(direction):  # a client's weights: global + direction (shaped like the model)
        out, offset = [], 0
        for name, a in g:
            out.append((name, (a + direction[offset:offset + a.size].reshape(a.shape)).astype(np.float32)))
            offset += a.size
        return out
    rounds.submit("client-0", 0, 10, shifted(g0))          # the root update itself: trust 1
    rounds.submit("client-1", 0, 10, shifted(-100 * g0))   # boosted and reversed: trust 0
    new = np.concatenate([a.ravel() for _, a in rounds.params]) - np.concatenate([a.ravel() for _, a in g])
    np.testing.assert_allclose(new, g0, atol=1e-5)
    clip = FedAvgRounds(FedAvgPlan(num_clients=2, rounds=1, norm_bound=4.0, norm_mode="clip"), [("w", np.zeros(4, np.float32))])
    clip.submit("client-0", 0, 1, [("w", np.array([0.5, 0, 0, 0], np.float32))])
    clip.submit("client-1", 0, 1, [("w", np.full(4, 3.0, np.float32))])  # norm 6: clipped to 4
    np.testing.assert_allclose(dict(clip.params)["w"], [1.25, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="norm bound"):
        FedAvgPlan(norm_bound=1.0, robust="fltrust")
    with pytest.raises(ValueError, match="inside MPC"):
        SecAggPlan(training=FedAvgPlan(robust="fltrust"))


def test_cli_refuses_a_bad_malice():
    from typer.testing import CliRunner

    from securecollab.cli import app
    result = CliRunner().invoke(app, ["client", "fedavg", "--target", "localhost:1", "--id", "client-0", "--index", "0",
                                      "--malice", '{"behaviour": "teleport"}'])
    assert result.exit_code == 2 and "unknown malicious behaviour" in result.output


@pytest.mark.timeout(900)
def test_model_replacement_backdoor_succeeds_against_fedavg_and_fails_against_the_sound_mpc_norm_bound(tmp_path):
    from attacks.poisoning import backdoor
    from experiments.backdoor import BOUND, N_CLIENTS, ROUNDS, malice
    from securecollab.runs import run_protocol

    plan = FedAvgPlan(num_clients=N_CLIENTS, rounds=ROUNDS)
    m = malice("model_replacement", 1)
    run_protocol("fedavg", plan, tmp_path / "clean")
    run_protocol("fedavg", plan, tmp_path / "attacked", malicious={"client-0": m})
    run_protocol("secagg", plan, tmp_path / "bounded", malicious={"client-0": m},
                 secagg=SecAggPlan(training=plan, norm_bound=BOUND))
    (attacked,) = backdoor(tmp_path / "attacked", malice=m, baseline_run=tmp_path / "clean")
    (bounded,) = backdoor(tmp_path / "bounded", protocol="secagg", malice=m, baseline_run=tmp_path / "clean")
    clean = attacked["baseline"]
    a, b = attacked["metrics"], bounded["metrics"]
    assert a["attack_success_rate"] >= 0.9, a
    assert abs(a["main_accuracy"] - clean["main_accuracy"]) <= 0.02, (a, clean)
    assert abs(b["attack_success_rate"] - clean["attack_success_rate"]) <= 0.10, (b, clean)
    assert abs(b["main_accuracy"] - clean["main_accuracy"]) <= 0.02, (b, clean)
    # the coordinator saw only the count: nine of ten updates in the last round
    from securecollab.transcript import Kind, load_transcript
    last = load_transcript(tmp_path / "bounded" / "transcripts" / "coordinator.jsonl").of_kind(Kind.AGGREGATE)[-1]
    (aggregate,) = last.tensors.values()
    assert round(float(aggregate[-1])) == N_CLIENTS - 1


def _backdoor_row(protocol, behaviour, defence, fraction, asr, main, by_round=None):
    return {"attack": "backdoor", "protocol": protocol, "baseline": {"attack_success_rate": 0.0},
            "metrics": {"behaviour": behaviour, "defence": defence, "malicious_fraction": fraction,
                        "attack_success_rate": asr, "main_accuracy": main, "asr_by_round": by_round or [asr]}}


def test_backdoor_figure_adds_the_malicious_fraction_panel_only_when_the_sweep_has_several(tmp_path):
    from matplotlib.image import imread

    from experiments.backdoor import plot
    quick = [_backdoor_row("fedavg", "model_replacement", "none", 0.1, 0.97, 0.94),
             _backdoor_row("secagg", "model_replacement", "norm_bound(4)", 0.1, 0.0, 0.95),
             _backdoor_row("secagg", "adaptive", "norm_bound(4)", 0.1, 0.8, 0.95, [0.4, 0.1, 0.8])]
    full = quick + [_backdoor_row(p, "model_replacement", d, f, a, 0.94) for f in (0.2, 0.3)
                    for p, d, a in (("fedavg", "none", 0.98), ("secagg", "norm_bound(4)", 0.0))]
    plot(quick, tmp_path / "quick.png")
    plot(full, tmp_path / "full.png")
    quick_png, full_png = imread(tmp_path / "quick.png"), imread(tmp_path / "full.png")
    assert full_png.shape[1] > 1.3 * quick_png.shape[1]  # a third panel: ASR against the malicious fraction
