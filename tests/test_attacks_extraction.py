"""Model extraction by a querying HE or MPC client: equation solving, distillation, the label-only view, controls.

Most tests query a plaintext copy of the target (the attack only sees
(query, answer) pairs, so the oracle's form does not matter); the last ones
go through a real HE server process and a label-only MPC deployment and the
client's transcript.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from attacks.extraction import (
    PLAN_FILE,
    DistillConfig,
    aux_labels_student,
    extract,
    fidelity,
    linear_predict,
    load_declared,
    majority_fidelity,
    random_queries,
    solve_linear,
)
from attacks.extraction import run as extraction_attack
from attacks.extraction_view import QueryLog, observe, read_queries, record_query
from attacks.registry import ATTACKS, discover
from experiments.registry import EXPERIMENTS
from experiments.registry import discover as discover_experiments
from securecollab.models import build_model
from securecollab.plans import HEModelPlan, MpcInferencePlan, save_weights
from securecollab.training import predict_logits
from securecollab.transcript import Kind, TranscriptRecorder, load_transcript

D = 64  # 8x8 digits


@pytest.fixture(scope="module")
def digits():
    return HEModelPlan().load_data()


@pytest.fixture(scope="module")
def linear_target(digits):
    from attacks.extraction import one_thread
    with one_thread():
        model, _ = HEModelPlan(model="linear").train(digits)
    return model


@pytest.fixture(scope="module")
def convnet_target(digits):
    from attacks.extraction import one_thread
    with one_thread():
        model, _ = HEModelPlan().train(digits)
    return model


def _labels(model, x):
    return predict_logits(model, x).argmax(1)


def _weights(linear):
    return linear[1].weight.detach().double().numpy(), linear[1].bias.detach().double().numpy()


def _aux(digits, n, seed=0):
    pick = np.random.default_rng(seed).permutation(len(digits.x_train))[:n]
    return digits.x_train[pick], digits.y_train[pick]


def test_equation_solving_recovers_a_linear_model_from_exact_logits(digits, linear_target):
    q = random_queries(D + 1, digits.input_shape, seed=0)
    w, b = solve_linear(q, predict_logits(linear_target, q))
    w_true, b_true = _weights(linear_target)
    assert np.abs(w - w_true).max() < 1e-3 and np.abs(b - b_true).max() < 1e-3  # float32 logits only
    assert fidelity(linear_predict(w, b, digits.x_test).argmax(1), _labels(linear_target, digits.x_test))[
        "fidelity"] == 1.0


def test_equation_solving_absorbs_ckks_sized_noise(digits, linear_target):
    w_true, _ = _weights(linear_target)
    target = _labels(linear_target, digits.x_test)
    rng = np.random.default_rng(1)
    # 2(d+1) queries: least squares averages the 1e-3 noise; the test set has a top-2 margin of 0.008
    q = random_queries(2 * (D + 1), digits.input_shape, seed=1)
    noisy = predict_logits(linear_target, q) + rng.normal(0.0, 1e-3, (len(q), 10))
    w, b = solve_linear(q, noisy)
    assert np.abs(w - w_true).max() < 0.01
    assert fidelity(linear_predict(w, b, digits.x_test).argmax(1), target)["fidelity"] == 1.0
    # exactly d+1 noisy queries: the noise is amplified by the design's conditioning, still near-perfect
    q = random_queries(D + 1, digits.input_shape, seed=2)
    w, b = solve_linear(q, predict_logits(linear_target, q) + rng.normal(0.0, 1e-3, (len(q), 10)))
    assert fidelity(linear_predict(w, b, digits.x_test).argmax(1), target)["fidelity"] >= 0.98
    # fewer than d+1 queries leave W under-determined
    q = random_queries(D // 2, digits.input_shape, seed=3)
    w, _ = solve_linear(q, predict_logits(linear_target, q))
    assert np.abs(w - w_true).max() > 0.1


def test_distillation_on_logits_beats_the_no_query_baseline(digits, convnet_target):
    x, y = _aux(digits, 100)
    target = _labels(convnet_target, digits.x_test)
    log = QueryLog(x, predict_logits(convnet_target, x).astype(np.float64), y)
    kw = dict(architecture="convnet", input_shape=digits.input_shape, num_classes=10)
    attack = fidelity(extract(log, output="logits", **kw).predict(digits.x_test).argmax(1), target)
    base = fidelity(aux_labels_student(x, y, **kw).predict(digits.x_test).argmax(1), target)
    assert attack["fidelity"] >= 0.95
    assert attack["fidelity_ci"][0] > base["fidelity_ci"][1]  # intervals apart
    # label-only view: no more than the attacker's own labels give (the defence's effect, not enforcement)
    label_only = fidelity(extract(log, output="label", **kw).predict(digits.x_test).argmax(1), target)
    assert label_only["fidelity"] <= base["fidelity"] + 0.03
    assert label_only["fidelity_ci"][1] < attack["fidelity_ci"][0]
    with pytest.raises(ValueError, match="equation solving needs the logits"):
        extract(log, output="label", method="equation_solving", **kw)


def test_control_shuffled_answers_score_at_chance(digits, convnet_target, linear_target):
    x, y = _aux(digits, 200)
    perm = np.random.default_rng(0).permutation(len(x))
    kw = dict(input_shape=digits.input_shape, num_classes=10)
    for name, target_model in (("convnet", convnet_target), ("linear", linear_target)):
        target = _labels(target_model, digits.x_test)
        shuffled = QueryLog(x, predict_logits(target_model, x)[perm].astype(np.float64), y)
        got = fidelity(extract(shuffled, architecture=name, output="logits", **kw).predict(digits.x_test)
                       .argmax(1), target)["fidelity"]
        # chance is 0.1 on balanced digits; a constant answer scores the majority rate
        assert got < 0.3, (name, got)
        assert majority_fidelity(y, target, 10) < 0.3


def test_control_the_no_query_baseline_knows_nothing_of_an_untrained_target(digits):
    """Against an untrained target the own-labels baseline falls to chance while extraction still works:
    the gap the scorecard reports comes from the answers, not from knowing the task."""
    untrained = build_model("convnet", digits.input_shape, 10, activation="square", seed=3)
    target = _labels(untrained, digits.x_test)
    x, y = _aux(digits, 200)
    kw = dict(architecture="convnet", input_shape=digits.input_shape, num_classes=10)
    base = fidelity(aux_labels_student(x, y, **kw).predict(digits.x_test).argmax(1), target)["fidelity"]
    log = QueryLog(x, predict_logits(untrained, x).astype(np.float64), y)
    attack = fidelity(extract(log, output="logits", **kw).predict(digits.x_test).argmax(1), target)["fidelity"]
    assert base < 0.3
    assert attack > 0.7


def test_queries_pair_with_batched_answers_in_order(tmp_path):
    path = tmp_path / "client.jsonl"
    rec = TranscriptRecorder(path, party="client-0", role="client")
    x1, x2 = np.zeros((5, 1, 2, 2), np.float32), np.ones((2, 1, 2, 2), np.float32)
    record_query(rec, x1, source="aux", labels=np.arange(5))
    for step, rows in enumerate((3, 2)):  # infer_batch splits by the session's batch size
        rec.record(Kind.LOGITS, round=0, step=step, sender="he-server", meta={"mode": "batch"},
                   tensors={"logits": np.full((rows, 3), step, np.float32)})
    rec.record(Kind.LOGITS, round=0, step=9, sender="he-server", meta={"mode": "single"},
               tensors={"logits": np.zeros(3, np.float32)})  # single queries are not part of a batch query
    record_query(rec, x2, source="random")
    rec.record(Kind.LOGITS, round=0, step=2, sender="he-server", meta={"mode": "batch"},
               tensors={"logits": np.full((2, 3), 7, np.float32)})
    t = load_transcript(path)
    aux = read_queries(t, "aux")
    assert aux.queries.shape == (5, 1, 2, 2) and aux.logits[:, 0].tolist() == [0, 0, 0, 1, 1]
    assert aux.labels.tolist() == [0, 1, 2, 3, 4]
    rand = read_queries(t, "random")
    assert rand.logits[:, 0].tolist() == [7, 7] and rand.labels.tolist() == [-1, -1]
    assert len(read_queries(t).queries) == 7
    assert observe(rand.logits, "label").dtype == np.int64
    with pytest.raises(ValueError, match="no recorded queries"):
        read_queries(t, "nothing")
    record_query(rec, x2, source="aux")  # sent but never answered
    with pytest.raises(ValueError, match="fewer answers"):
        read_queries(load_transcript(path))


def _mpc_labels_transcript(path, batches, source="aux"):
    """A label-only MPC client's transcript as services/mpc_client.py writes it: the attacker's own QUERY
    record, then one LABELS record (labels and the parties' answer shares) per request of at most max_batch."""
    rec = TranscriptRecorder(path, party="client-0", role="client")
    x = np.concatenate([b[0] for b in batches])
    record_query(rec, x, source=source, labels=np.concatenate([b[1] for b in batches]))
    for step, (xb, labels) in enumerate(batches):
        n = len(xb)
        rec.record(Kind.LABELS, round=0, step=step, sender="parties",
                   meta={"mode": "batch", "protocol": "mpc", "num_inputs": n, "model_id": "m"},
                   tensors={"labels": np.asarray(labels, np.int64),
                            **{f"share_{i}": np.zeros(n, np.int64) for i in range(3)}})
    return rec


def test_label_only_transcripts_read_as_labels_and_refuse_logits(tmp_path):
    path = tmp_path / "client.jsonl"
    x = np.arange(7 * 4, dtype=np.float32).reshape(7, 1, 2, 2)
    rec = _mpc_labels_transcript(path, [(x[:4], [3, 1, 4, 1]), (x[4:], [5, 9, 2])])
    log = read_queries(load_transcript(path), "aux")
    assert log.label_only and log.answers.dtype == np.int64 and log.answers.tolist() == [3, 1, 4, 1, 5, 9, 2]
    assert log.queries.shape == (7, 1, 2, 2) and np.array_equal(log.queries, x)
    assert log.first(3).answers.tolist() == [3, 1, 4]
    assert observe(log.answers, "label").tolist() == [3, 1, 4, 1, 5, 9, 2]
    with pytest.raises(ValueError, match="label-only transcript"):
        observe(log.answers, "logits")
    with pytest.raises(ValueError, match="label-only transcript"):
        log.logits
    with pytest.raises(ValueError, match="label-only transcript"):
        extract(log, architecture="linear", input_shape=(1, 2, 2), num_classes=10, output="logits")
    with pytest.raises(ValueError, match="unknown output"):
        observe(log.answers, "probabilities")
    # logits records after label records: two deployments' answers in one transcript
    rec.record(Kind.LOGITS, round=0, step=9, sender="parties", meta={"mode": "batch"},
               tensors={"logits": np.zeros((1, 10), np.float32)})
    with pytest.raises(ValueError, match="mixes logits and label"):
        read_queries(load_transcript(path))


def _mpc_run_dir(run_dir, digits, n, seed=0):
    """A label-only MPC run directory without services: an untrained ReLU convnet's labels as the answers."""
    plan = MpcInferencePlan(model="convnet", output="label", seed=seed)
    target = build_model("convnet", digits.input_shape, 10, activation="relu", seed=5)
    save_weights(target, run_dir / "mpc_model.npz")
    x, y = _aux(digits, n)
    labels = _labels(target, x)
    _mpc_labels_transcript(run_dir / "transcripts" / "client-0.jsonl", [(x[:n // 2], labels[:n // 2]),
                                                                         (x[n // 2:], labels[n // 2:])])
    (run_dir / PLAN_FILE).write_text(json.dumps({"protocol": "mpc_inference", "plan": plan.to_json(),
                                                 "client": "client-0"}))
    return run_dir, target


def test_the_attack_on_a_label_only_mpc_transcript(tmp_path, digits):
    run_dir, target = _mpc_run_dir(tmp_path, digits, 120)
    with pytest.raises(ValueError, match="label-only transcript"):
        extraction_attack(run_dir, output="logits")
    rows = extraction_attack(run_dir, budgets=(60, 120), output="label", config=DistillConfig(steps=60))
    assert [r["metrics"]["queries"] for r in rows] == [60, 120]
    for r in rows:
        m = r["metrics"]
        assert r["protocol"] == "mpc_inference" and r["adversary"] == "mpc-client"
        assert m["enforced"] is True and m["activation"] == "relu" and m["method"] == "distillation"
        assert 0.0 <= m["fidelity"] <= 1.0 and r["baseline"]["labelled_examples"] == m["queries"]
    json.dumps(rows)
    # extraction.json from before MPC (no "protocol") is an HE run
    (tmp_path / PLAN_FILE).write_text(json.dumps({"plan": HEModelPlan().to_json(), "client": "client-0"}))
    protocol, plan, client = load_declared(tmp_path)
    assert protocol == "he_inference" and isinstance(plan, HEModelPlan) and client == "client-0"


def test_registered():
    discover()
    discover_experiments()
    assert ATTACKS["extraction"].adversary == "he-client | mpc-client"
    assert set(ATTACKS["extraction"].protocols) == {"he_inference", "mpc_inference"}
    assert "extraction" in EXPERIMENTS["extraction"].attacks


@pytest.mark.slow
def test_extraction_through_the_he_service(tmp_path):
    """A real HE server process serves the linear model; the client's own transcript is the attack's input."""
    from experiments.extraction import serve_and_query

    run_dir = serve_and_query(HEModelPlan(model="linear"), tmp_path / "run", aux_queries=70, random_count=2 * (D + 1),
                              seed=0, progress=lambda _m: None)
    assert json.loads((run_dir / "extraction.json").read_text())["client"] == "client-0"
    rows = extraction_attack(run_dir, budgets=(D // 2, D + 1, 2 * (D + 1)), output="logits", source="random",
                             with_baseline=False)
    by_n = {r["metrics"]["queries"]: r["metrics"] for r in rows}
    assert by_n[D + 1]["fidelity"] == 1.0 and by_n[2 * (D + 1)]["fidelity"] == 1.0
    assert by_n[2 * (D + 1)]["max_abs_weight_error"] < 0.01  # CKKS noise is ~1e-4 per logit here
    assert by_n[D // 2]["fidelity"] < 1.0
    assert all(r["attack"] == "extraction" and r["protocol"] == "he_inference" for r in rows)
    control = extraction_attack(run_dir, output="logits", source="random", shuffle_answers=True,
                                with_baseline=False)[0]["metrics"]
    assert control["fidelity"] < 0.3 and control["control"] == "answers_shuffled"
    label_row = extraction_attack(run_dir, budgets=(70,), output="label", source="aux")[0]
    assert label_row["metrics"]["method"] == "distillation" and "fidelity" in label_row["baseline"]
    assert label_row["metrics"]["enforced"] is False  # the HE client decrypted logits: the view is a choice
    json.dumps(rows + [label_row])  # JSON-safe


@pytest.mark.slow
def test_extraction_through_a_label_only_mpc_deployment(tmp_path):
    """A real label-only MPC deployment (dealer + three compute parties) serves the ReLU convnet; the client's
    transcript holds labels only, so the attack distils on labels and refuses to read logits."""
    from experiments.extraction import serve_and_query_mpc

    plan = MpcInferencePlan(model="convnet", output="label", epochs=5, max_batch=64)
    run_dir = serve_and_query_mpc(plan, tmp_path / "run", aux_queries=100, seed=0, progress=lambda _m: None)
    declared = json.loads((run_dir / PLAN_FILE).read_text())
    assert declared["protocol"] == "mpc_inference" and declared["client"] == "client-0"
    t = load_transcript(run_dir / "transcripts" / "client-0.jsonl")
    assert not t.of_kind(Kind.LOGITS) and [r.meta["num_inputs"] for r in t.of_kind(Kind.LABELS)] == [64, 36]
    with pytest.raises(ValueError, match="label-only transcript"):
        extraction_attack(run_dir, output="logits")
    rows = extraction_attack(run_dir, budgets=(50, 100), output="label", source="aux",
                             config=DistillConfig(steps=200))
    assert all(r["protocol"] == "mpc_inference" and r["adversary"] == "mpc-client" for r in rows)
    assert all(r["metrics"]["enforced"] is True and r["metrics"]["activation"] == "relu" for r in rows)
    # the labels the client received are the owner's model's labels (scoring reads the weights only here)
    model, ds = plan.load(run_dir / "mpc_model.npz", plan.load_data())
    log = read_queries(t, "aux")
    assert (log.answers == _labels(model, log.queries)).mean() >= 0.99
