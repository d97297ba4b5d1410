"""Attacks on real FedAvg transcripts, secure aggregation's aggregate, the attack CLI and the scorecard's attack table."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from attacks.fl_inversion import images_used, invert_aggregate, local_training
from attacks.gradient_inversion import InversionConfig
from attacks.registry import run_attack
from experiments.dp import dp_plan
from experiments.gradient_inversion import dropout_schedule, fedavg_plan, fedsgd_plan
from securecollab.cli import app
from securecollab.data import load_dataset
from securecollab.models import parameters_to_arrays
from securecollab.plans import FedAvgPlan, client_data
from securecollab.protocols.fedavg import local_update
from securecollab.scorecard import attack_cells, to_markdown
from securecollab.transcript import Kind, TranscriptRecorder
from securecollab.vocabulary import row_problems


@pytest.fixture(scope="module")
def fedsgd_run(tmp_path_factory):
    """A real plain-FedAvg run over gRPC: 2 clients, 3 rounds, one image and one step each per round."""
    from securecollab.runs import run_protocol
    out = tmp_path_factory.mktemp("fl") / "fedavg"
    plan = fedsgd_plan(2, 3, seed=0)
    run_protocol("fedavg", plan, out)
    return out, plan


def test_fedsgd_round_is_one_step_on_the_image_the_attack_scores_against():
    plan = fedsgd_plan(2, 3, seed=0)
    ds, x, y = client_data(plan, 1)
    assert len(x) == 3
    model = plan.build_model(ds)
    start = parameters_to_arrays(model)
    new = dict(local_update(model, plan, 2, start, x, y, 1))
    used = images_used(plan, 1, 2)
    assert len(used) == 1
    reference = plan.build_model(ds)
    loss = torch.nn.functional.cross_entropy(reference(torch.as_tensor(ds.x_train[used])),
                                             torch.as_tensor(ds.y_train[used]))
    loss.backward()
    for name, p in reference.named_parameters():
        np.testing.assert_allclose(new[name], p.detach().numpy() - plan.lr * p.grad.numpy(), atol=1e-6)
    assert local_training(plan, 1, 2).num_steps(1) == 1


def test_analytic_and_optimization_attacks_on_a_real_aggregator_transcript(fedsgd_run, tmp_path):
    run_dir, _ = fedsgd_run
    (fc,) = run_attack("analytic_fc", run_dir)
    assert fc["metrics"]["images"] == 6 and fc["metrics"]["max_abs_error"] < 1e-5
    assert fc["baseline"]["psnr_db"] < 15
    (gi,) = run_attack("gradient_inversion", run_dir, iterations=120)
    m, b = gi["metrics"], gi["baseline"]
    assert m["n_clients"] == 1 and m["images"] == 6 and m["regime"] == "fedsgd"
    assert (m["samples_per_update"], m["local_steps"], m["defence"], m["prior"]) == (1, 1, "none", "tv")
    assert (fc["metrics"]["samples_per_update"], fc["metrics"]["local_steps"]) == (1, 1)
    assert row_problems([fc, gi]) == []
    assert m["psnr_db"] > 25 and m["label_accuracy"] == 1.0 and m["reid_rate"] == 1.0
    assert b["psnr_db"] < 15 and b["reid_rate"] < 0.5
    # the CLI runs the same attack on the saved run and writes the rows
    out = tmp_path / "rows.json"
    res = CliRunner().invoke(app, ["attack", "run", "analytic_fc", str(run_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())[0]["metrics"]["max_abs_error"] < 1e-5
    res = CliRunner().invoke(app, ["attack", "run", "no_such_attack", str(run_dir)])
    assert res.exit_code == 2 and "unknown attack" in res.output


def test_control_random_updates_in_the_transcript_score_at_baseline(fedsgd_run, tmp_path):
    """The same attack on a transcript whose updates carry N(0, 0.05) noise on every weight finds nothing."""
    from securecollab.transcript import load_transcript
    run_dir, plan = fedsgd_run
    fake = tmp_path / "fake"
    rec = TranscriptRecorder(fake / "transcripts" / "aggregator.jsonl", party="aggregator", role="aggregator")
    rng = np.random.default_rng(5)
    for r in load_transcript(run_dir / "transcripts" / "aggregator.jsonl").records:
        tensors = {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in r.tensors.items()}
        rec.record(r.kind, round=r.round, sender=r.sender, meta=r.meta, tensors=tensors if r.kind == Kind.UPDATE else {})
    (gi,) = run_attack("gradient_inversion", fake, iterations=60)
    assert gi["metrics"]["psnr_db"] < gi["baseline"]["psnr_db"] + 3
    assert gi["metrics"]["reid_rate"] <= 0.5


def with_plan(run_dir, plan, out):
    """The aggregator's transcript of ``run_dir`` as if it had written ``plan``: only the labels are under test."""
    from securecollab.transcript import load_transcript
    rec = TranscriptRecorder(out / "transcripts" / "aggregator.jsonl", party="aggregator", role="aggregator")
    for r in load_transcript(run_dir / "transcripts" / "aggregator.jsonl").records:
        meta = {**r.meta, "plan": json.loads(plan.to_json())} if r.kind == Kind.PLAN else r.meta
        rec.record(r.kind, round=r.round, sender=r.sender, meta=meta, tensors=r.tensors)
    return out


@pytest.mark.parametrize("plan, want", [
    # one DP-SGD step on one image (the DP sweep): FedSGD, whatever the plan calls its local training
    (dp_plan(0.03, 3, seed=0), (1, 1, "fedsgd", "dp_sgd(noise=0.03,clip=1)")),
    (dp_plan(0.0, 3, seed=0), (1, 1, "fedsgd", "none")),
    # 32 images in batches of 8, one epoch: four local steps
    (fedavg_plan(2, 3, seed=0), (32, 4, "fedavg", "none")),
])
def test_rows_say_what_each_observed_update_aggregated(fedsgd_run, tmp_path, plan, want):
    from attacks.fl_inversion import invert_fedavg_run
    (gi,) = invert_fedavg_run(with_plan(fedsgd_run[0], plan, tmp_path), iterations=2, max_observations=1)
    m = gi["metrics"]
    assert (m["samples_per_update"], m["local_steps"], m["regime"], m["defence"]) == want
    assert m["images"] == m["samples_per_update"] * m["observations"] and row_problems([gi]) == []


def test_aggregate_of_two_fedsgd_updates_is_inverted_and_a_random_aggregate_is_not():
    """invert_aggregate on the sum the coordinator would reveal (update sum + client count)."""
    plan = fedsgd_plan(4, 2, seed=0)
    ds = load_dataset(plan.dataset, seed=plan.seed)
    model = plan.build_model(ds)
    start = parameters_to_arrays(model)
    included = ["client-0", "client-2"]
    total = None
    for c in included:
        i = int(c[-1])
        _, x, y = client_data(plan, i)
        new = local_update(plan.build_model(ds), plan, 0, start, x, y, i)
        delta = np.concatenate([(n - g).ravel() for (_, n), (_, g) in zip(new, start)])
        total = delta if total is None else total + delta
    aggregate = np.append(total, len(included)).astype(np.float64)
    truth = np.concatenate([images_used(plan, int(c[-1]), 0) for c in included])
    config = InversionConfig(iterations=150)
    inv = invert_aggregate(model, dict(start), aggregate, included, plan, 0, ds, config)
    from attacks.metrics import score_reconstructions
    got = score_reconstructions(inv.images, ds.x_train[truth])
    assert got["psnr_db"] > 25
    noise = np.append(np.random.default_rng(1).normal(0, 1e-3, total.shape), 2.0)
    inv = invert_aggregate(model, dict(start), noise, included, plan, 0, ds, InversionConfig(iterations=60))
    assert score_reconstructions(inv.images, ds.x_train[truth])["psnr_db"] < 16


def test_dropout_schedule_gives_each_level_its_clients():
    drops = dropout_schedule(2, (16, 8, 4, 2))
    assert {c for c, (_, r) in drops.items() if r == 2} == {f"client-{i}" for i in range(8, 16)}
    assert {c for c, (_, r) in drops.items() if r == 4} == {f"client-{i}" for i in range(4, 8)}
    assert {c for c, (_, r) in drops.items() if r == 6} == {"client-2", "client-3"}
    assert all(phase == "before_upload" for phase, _ in drops.values())


def test_fedavg_plan_refuses_bad_attack_and_dp_settings():
    with pytest.raises(ValueError):
        FedAvgPlan(samples_per_client=-1)
    with pytest.raises(ValueError):
        FedAvgPlan(dp_noise_multiplier=1.0, dp_max_grad_norm=0.0)
    with pytest.raises(ValueError):
        FedAvgPlan(dp_noise_multiplier=1.0, local_steps=1)
    assert FedAvgPlan().dp_epsilon(100) is None
    eps = [FedAvgPlan(dp_noise_multiplier=s, rounds=2).dp_epsilon(100) for s in (0.5, 1.0, 2.0)]
    assert eps[0] > eps[1] > eps[2] > 0


def test_scorecard_attack_table_shows_metric_beside_baseline_and_setting():
    row = {"attack": "gradient_inversion", "protocol": "secagg", "adversary": "coordinator",
           "metrics": {"psnr_db": 31.24, "reid_rate": 0.75, "reid_rate_ci": [0.4, 0.9], "n_clients": 4,
                       "regime": "fedsgd"},
           "baseline": {"psnr_db": 11.0, "reid_rate": 0.0}, "figure": "attacks/x.png"}
    cells = attack_cells(row)
    assert cells[3] == "N=4, fedsgd"
    assert cells[4] == "PSNR 31.2 dB; re-id 0.750 [0.40, 0.90]"
    assert cells[5] == "PSNR 11.0 dB; re-id 0.000"
    card = {"dataset": "digits", "model": "mlp", "created": "now", "protocols": {}, "attacks": [row]}
    md = to_markdown(card)
    assert "| gradient_inversion | secagg | coordinator | N=4, fedsgd |" in md and "![attacks/x.png]" in md
