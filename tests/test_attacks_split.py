"""The split server's attacks on transcripts its real service wrote: activation inversion and label leakage.

Each run here is the real gRPC service and clients (mutual TLS), in one process to stay fast.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from attacks import activation_inversion as ai
from attacks import label_leakage as ll
from attacks import split_view as sv
from attacks.registry import ATTACKS, discover
from experiments.registry import EXPERIMENTS
from experiments.registry import discover as discover_experiments
from experiments.split_attacks import configurations, plot_leakage, plot_reconstructions
from securecollab.models import parameters_to_arrays
from securecollab.plans import SplitPlan
from services.split_client import run_client
from services.split_server import serve

FAST = {"n_images": 64, "decoder_steps": 600, "iterations": 200}


def run_split_in_process(out: Path, plan: SplitPlan, tls_for) -> Path:
    """Server and clients over gRPC in this process; the server writes its transcript (and its part) under out."""
    server, state, _ = serve(plan, tls=tls_for("server"), host="127.0.0.1", out_dir=out, block=False)
    errors = []

    def client(i, cid):
        try:
            run_client(f"localhost:{server.port}", cid, i, tls=tls_for(cid))
        except Exception as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    try:
        threads = [threading.Thread(target=client, args=(i, cid)) for i, cid in enumerate(plan.client_ids())]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert state.all_finished.wait(timeout=10)
    finally:
        server.stop(grace=None)
    state.flush()
    np.savez(out / "split_server_part.npz", **dict(parameters_to_arrays(state.part)))
    sv.save_plan(out, plan)
    return out


@pytest.fixture(scope="module")
def vanilla_run(tmp_path_factory, tls_for):
    return run_split_in_process(tmp_path_factory.mktemp("vanilla"), SplitPlan(num_clients=2, epochs=3), tls_for)


@pytest.fixture(scope="module")
def ushaped_run(tmp_path_factory, tls_for):
    plan = SplitPlan(num_clients=2, epochs=3, mode="ushaped")
    return run_split_in_process(tmp_path_factory.mktemp("ushaped"), plan, tls_for)


def _scores(run_dir, **kw):
    view = sv.load_server_view(run_dir)
    ds = view.plan.load_data()
    result = ai.invert_activations(view, ds, run_dir, **{**FAST, **kw})
    return result, ai.score(result, ds)


def test_ground_truth_matches_what_the_real_service_recorded(vanilla_run):
    """The evaluator's mapping of recorded batches to training images is right: vanilla labels agree."""
    view = sv.load_server_view(vanilla_run)  # the plan saved beside the run
    assert view.last_epoch == 2 and len(view.client_weights) == 2 * 3
    truth = sv.GroundTruth(view.plan, view.plan.load_data())
    for r in view.batches[:: 7]:
        np.testing.assert_array_equal(r.tensors["labels"], truth.ds.y_train[truth.sources(r)])
    aux_x, _ = ai.auxiliary_split(truth.ds, 0)
    assert not (aux_x[:, None] == truth.ds.x_train[None]).all(axis=(2, 3, 4)).any()  # aux is not training data


def test_inversion_beats_the_mean_image_at_the_earliest_cut(vanilla_run):
    result, scores = _scores(vanilla_run)
    assert result["knowledge"] == "handoff_weights"
    dec, opt = scores["decoder"], scores["optimization"]
    assert dec["metrics"]["psnr_db"] > dec["baseline"]["psnr_db"] + 2.0, dec
    assert dec["metrics"]["ssim"] > dec["baseline"]["ssim"] + 0.2, dec
    # re-identification among all 1,347 training images: the blind guess finds none
    for s in (dec, opt):
        assert s["metrics"]["reid_rate_ci"][0] > s["baseline"]["reid_rate_ci"][1], s
    assert opt["metrics"]["ssim"] > opt["baseline"]["ssim"] + 0.1, opt


def test_control_inversion_through_an_untrained_bottom_is_at_baseline(vanilla_run):
    """The attacker's stand-in is a freshly initialised bottom (wrong seed): the real activations tell it nothing."""
    view = sv.load_server_view(vanilla_run)
    wrong = replace(view.plan, seed=123).build_model()
    bottom, _, _ = view.plan.parts(wrong)
    paths = {c: ai.BottomPath.constant(bottom) for c in view.plan.client_ids()}
    _, scores = _scores(vanilla_run, paths=paths)
    for method, s in scores.items():
        assert s["metrics"]["psnr_db"] < s["baseline"]["psnr_db"] + 1.0, (method, s)
        assert s["metrics"]["reid_rate"] <= 2 / 64, (method, s)


def test_control_noise_activations_give_nothing(vanilla_run):
    """The right weights but activations of pure noise (same scale): reconstructions are at the blind guess."""
    view = sv.load_server_view(vanilla_run)
    real = np.concatenate([r.tensors["activations"] for r in view.batches if r.round == view.last_epoch])
    noise = np.abs(np.random.default_rng(0).normal(0, real.std(), real.shape)).astype(np.float32)
    _, scores = _scores(vanilla_run, activations=noise)
    for method, s in scores.items():
        assert s["metrics"]["psnr_db"] < s["baseline"]["psnr_db"] + 1.0, (method, s)
        assert s["metrics"]["reid_rate"] <= 2 / 64, (method, s)


def test_without_handed_off_weights_the_server_attacks_through_a_clone(vanilla_run):
    view = sv.load_server_view(vanilla_run)
    view.client_weights = []  # as in per_client mode: no hand-off passes through the server
    ds = view.plan.load_data()
    result = ai.invert_activations(view, ds, vanilla_run, methods=("decoder",), **FAST)
    assert result["knowledge"] == "clone"
    rows = ai.rows_for(view, ai.score(result, ds), result["knowledge"])
    assert rows[0]["metrics"]["knowledge"] == "clone" and rows[0]["metrics"]["cut"] == "after_fc1"
    json.dumps(rows, allow_nan=False)


def test_registered_attack_rows(vanilla_run, ushaped_run):
    discover()
    discover_experiments()
    assert ATTACKS["activation_inversion"].adversary == "split-server"
    assert {"activation_inversion", "label_leakage"} <= set(EXPERIMENTS["split_attacks"].attacks)
    rows = ATTACKS["label_leakage"].run(vanilla_run)
    assert [r["metrics"]["method"] for r in rows] == ["plaintext"]  # vanilla sends labels in the clear
    assert rows[0]["metrics"]["label_accuracy"] == 1.0
    assert rows[0]["baseline"]["label_accuracy"] < 0.2
    rows += ATTACKS["label_leakage"].run(ushaped_run)
    json.dumps(rows, allow_nan=False)
    for r in rows:
        assert r["protocol"] == "split" and r["adversary"] == "split-server"
        assert {"cut", "defence", "method"} <= set(r["metrics"])


def test_ushaped_label_leakage_from_returned_gradients(ushaped_run):
    view = sv.load_server_view(ushaped_run)
    assert all("labels" not in r.tensors for r in view.batches)  # labels really stayed home
    ds = view.plan.load_data()
    grads, labels = ll.last_epoch_gradients(view, sv.GroundTruth(view.plan, ds))
    results = ll.leak_labels(grads, labels, ds.num_classes, prior_labels=ds.y_test)
    for method in ("cosine", "cluster"):
        m, b = results[method]["metrics"], results[method]["baseline"]
        assert m["auc_ci"][0] > 0.85, (method, m)
        assert m["label_accuracy_ci"][0] > b["label_accuracy_ci"][1] + 0.3, (method, m, b)


def test_control_label_leakage_on_unrelated_labels_is_at_chance(ushaped_run):
    """Gradients scored against shuffled labels, and random gradients against the true ones: AUC ~ 0.5."""
    view = sv.load_server_view(ushaped_run)
    ds = view.plan.load_data()
    grads, labels = ll.last_epoch_gradients(view, sv.GroundTruth(view.plan, ds))
    rng = np.random.default_rng(1)
    for g, y in ((grads, rng.permutation(labels)), (rng.normal(size=grads.shape), labels)):
        results = ll.leak_labels(g, y, ds.num_classes, prior_labels=ds.y_test)
        for method in ("norm", "cosine", "cluster"):  # the clusters are named by the known examples alone
            assert abs(results[method]["metrics"]["auc"] - 0.5) < 0.05, (method, results[method])
        for method in ("cosine", "cluster"):
            assert results[method]["metrics"]["label_accuracy_ci"][0] < results[method]["baseline"]["label_accuracy"]


def test_auc_is_the_mann_whitney_statistic():
    assert ll.auc(np.array([0.1, 0.2, 0.9, 0.8]), np.array([0, 0, 1, 1])) == 1.0
    assert ll.auc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([0, 0, 1, 1])) == 0.0
    assert ll.auc(np.ones(4), np.array([0, 1, 0, 1])) == 0.5


def test_sweep_covers_every_cut_and_defence_and_plots(tmp_path, vanilla_run, ushaped_run):
    cuts = set(SplitPlan().build_model().cut_points)
    full = configurations(quick=False, seed=0)
    assert {p.cut for p in full if p.mode == "vanilla"} == cuts
    assert {sv.describe_defence(p)["defence"] for p in full} == {"none", "noise", "nopeek"}
    assert any(p.client_weights == "per_client" for p in full)
    quick = configurations(quick=True, seed=0)
    assert {p.cut for p in quick} == cuts and any(p.mode == "ushaped" for p in quick)
    # the figures, from rows of the real runs above (cheap settings)
    rows, grids = [], []
    for run in (vanilla_run, ushaped_run):
        view = sv.load_server_view(run)
        ds = view.plan.load_data()
        result = ai.invert_activations(view, ds, run, n_images=16, decoder_steps=50, iterations=10)
        rows += ai.rows_for(view, ai.score(result, ds), result["knowledge"], accuracy=0.9)
        rows += ll.label_leakage(run, accuracy=0.9)
        grids.append((run.name, {"originals": ds.x_train[result["sources"][:8]],
                                 **{m: r[:8] for m, r in result["reconstructions"].items()}}))
    plot_reconstructions(grids, tmp_path / "grid.png")
    plot_leakage(rows, tmp_path / "leak.png")
    assert (tmp_path / "grid.png").stat().st_size > 1000 and (tmp_path / "leak.png").stat().st_size > 1000
