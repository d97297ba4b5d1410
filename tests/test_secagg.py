"""Secure aggregation across real processes: coordinator, 3 compute parties, dealer and clients over mutual TLS.

The plaintext each client shared is recomputed by replaying its deterministic
local training from the global model recorded in its own transcript; the
revealed aggregate in the coordinator's transcript must equal their sum.
"""

import json

import numpy as np
import pytest

from securecollab.plans import FedAvgPlan, SecAggPlan, client_data
from securecollab.protocols.fedavg import local_update
from securecollab.runs import run_protocol
from securecollab.transcript import load_transcript
from securecollab.updates import update_vector

pytestmark = pytest.mark.slow
FIXED_POINT_STEP = 2.0 ** -16


def replayed_updates(plan: FedAvgPlan, run_dir, round_: int, boosts=None) -> dict[str, np.ndarray]:
    """Each surviving client's update vector for a round, as it computed it before sharing."""
    updates = {}
    for i, cid in enumerate(plan.client_ids()):
        path = run_dir / "transcripts" / f"{cid}.jsonl"
        records = [r for r in load_transcript(path).of_kind("global_model") if r.round == round_ and not r.meta["done"]]
        if not records:
            continue
        ds, x, y = client_data(plan, i)
        model = plan.build_model(ds)
        params = list(records[0].tensors.items())
        vec = update_vector(local_update(model, plan, round_, params, x, y, i), params)
        vec[:-1] *= (boosts or {}).get(cid, 1.0)
        updates[cid] = vec
    return updates


def aggregates(run_dir) -> dict[int, tuple[list[str], np.ndarray]]:
    coord = load_transcript(run_dir / "transcripts" / "coordinator.jsonl")
    return {r.round: (r.meta["included"], r.tensors["aggregate"]) for r in coord.of_kind("aggregate")}


@pytest.fixture(scope="module")
def ten_clients(tmp_path_factory):
    """10 clients, 3 compute parties, dense shares (no seed compression), one round."""
    out = tmp_path_factory.mktemp("secagg10") / "secagg"
    plan = FedAvgPlan(num_clients=10, rounds=1, local_epochs=1)
    spec = SecAggPlan(training=plan, n_parties=3, seed_compression=False, upload_deadline_s=120)
    run_protocol("secagg", plan, out, secagg=spec)
    return plan, out


def test_revealed_aggregate_equals_plaintext_sum(ten_clients):
    plan, out = ten_clients
    included, aggregate = aggregates(out)[0]
    updates = replayed_updates(plan, out, 0)
    assert included == sorted(plan.client_ids())
    expected = np.sum([updates[c] for c in included], axis=0)
    assert aggregate[-1] == pytest.approx(10.0, abs=1e-3)
    np.testing.assert_allclose(aggregate, expected, rtol=0, atol=10 * FIXED_POINT_STEP)
    assert np.abs(expected[:-1]).max() > 100 * FIXED_POINT_STEP  # not trivially small


def test_compute_party_transcript_is_independent_of_client_updates(ten_clients):
    plan, out = ten_clients
    updates = replayed_updates(plan, out, 0)
    for p in range(3):
        records = load_transcript(out / "transcripts" / f"party-{p}.jsonl").of_kind("share")
        assert {r.sender for r in records} == set(plan.client_ids())  # it saw every client's share ...
        for r in records:
            assert r.tensors["share"].dtype == np.uint32  # a plain sum: Z_2^32
            # ... each a uniformly random element of Z_2^32, read as a signed residue
            share = r.tensors["share"].astype(np.uint32).view(np.int32).astype(np.float64)
            u = updates[r.sender][:-1]
            corr = np.corrcoef(share[:-1], u)[0, 1]
            assert abs(corr) < 6 / np.sqrt(len(u)), (p, r.sender, corr)
            assert abs(np.mean(share) / 2.0 ** 31) < 0.05 and np.std(share) / 2.0 ** 31 > 0.5  # spans the ring
            # and its fixed-point decoding is nowhere near the update (the encoding itself: all within 2^-16)
            assert np.mean(np.abs(share[:-1] / 2 ** 16 - u) < 1.0) < 0.01


def test_dropout_of_30_percent_at_every_phase_leaves_the_round_correct(tmp_path):
    out = tmp_path / "secagg"
    plan = FedAvgPlan(num_clients=10, rounds=2, local_epochs=1)
    # Generous: the deadline runs from the first report and must cover the start-up of 10 client processes
    # (torch alone is ~2 s of CPU each) on 2 cores beside the other test worker.
    # the 64-bit ring for a plain sum (--wide-ring), so that path runs through the services too
    spec = SecAggPlan(training=plan, n_parties=3, min_clients=5, upload_deadline_s=30, narrow_ring=False)
    drops = {"client-1": ("before_upload", 0), "client-4": ("mid_upload", 0),
             "client-7": ("partial_upload", 0)}
    run_protocol("secagg", plan, out, secagg=spec, drops=drops)
    rounds = aggregates(out)
    survivors = sorted(set(plan.client_ids()) - set(drops))
    for r in (0, 1):
        included, aggregate = rounds[r]
        assert included == survivors, (r, included)
        updates = replayed_updates(plan, out, r)
        expected = np.sum([updates[c] for c in survivors], axis=0)
        np.testing.assert_allclose(aggregate, expected, rtol=0, atol=10 * FIXED_POINT_STEP)
    # the partial uploader reached party 0 only: that share was held but never counted
    shares_0 = load_transcript(out / "transcripts" / "party-0.jsonl").of_kind("share")
    held_by_0 = {r.sender for r in shares_0}
    assert {r.tensors["share"].dtype for r in shares_0 if "share" in r.tensors} == {np.dtype(np.int64)}  # wide
    assert "client-7" in held_by_0


def test_update_with_100x_the_norm_bound_is_excluded_and_no_norm_is_revealed(tmp_path):
    out = tmp_path / "secagg"
    plan = FedAvgPlan(num_clients=5, rounds=1, local_epochs=1)
    bound, boost = 2.0, 1000.0  # honest norms are ~1.1 (delta ~0.5, plus the count coordinate)
    spec = SecAggPlan(training=plan, n_parties=3, norm_bound=bound, upload_deadline_s=60)
    run_protocol("secagg", plan, out, secagg=spec, boosts={"client-2": boost})
    updates = replayed_updates(plan, out, 0, boosts={"client-2": boost})
    norms = {c: float(np.linalg.norm(u)) for c, u in updates.items()}
    assert norms["client-2"] >= 100 * bound and max(n for c, n in norms.items() if c != "client-2") < bound
    included, aggregate = aggregates(out)[0]
    assert included == sorted(plan.client_ids())  # every client's shares were complete ...
    assert aggregate[-1] == pytest.approx(4.0, abs=1e-3)  # ... and MPC rejected one: only the count shows it
    expected = np.sum([u for c, u in updates.items() if c != "client-2"], axis=0)
    np.testing.assert_allclose(aggregate, expected, rtol=0, atol=10 * FIXED_POINT_STEP)
    # No transcript holds any client's norm (or squared norm) in the clear.
    targets = np.array([v for n in norms.values() for v in (n, n * n)])
    for name in ["coordinator", "party-0", "party-1", "party-2"]:
        for rec in load_transcript(out / "transcripts" / f"{name}.jsonl").records:
            for arr in rec.tensors.values():
                vals = arr.astype(np.float64).ravel()
                if arr.dtype == np.int64:
                    vals = vals / 2 ** 16
                for t in targets:
                    assert not np.any(np.abs(vals - t) <= FIXED_POINT_STEP), (name, rec.kind, t)


@pytest.fixture(scope="module")
def secure_vs_plain(tmp_path_factory):
    out = tmp_path_factory.mktemp("secure_vs_plain")
    plan = FedAvgPlan(num_clients=4)
    return (run_protocol("secagg", plan, out / "secagg"), run_protocol("fedavg", plan, out / "fedavg"))


def test_fedavg_with_secure_aggregation_matches_plain_fedavg_within_1pp(secure_vs_plain):
    secure, plain = secure_vs_plain
    assert plain["accuracy"] > 0.9
    assert abs(secure["accuracy"] - plain["accuracy"]) <= 0.01, (secure["accuracy"], plain["accuracy"])
    # secure upload per client: one share (seed compression) of 4-byte words (a plain sum: Z_2^32) vs float32
    assert 0.99 <= secure["costs"]["bytes_sent"] / plain["costs"]["bytes_sent"] <= 1.1


def test_fault_compute_party_killed_mid_round_aborts_it_and_the_next_round_succeeds(tmp_path):
    """Party 1 dies holding a share of round 1: that round is aborted with a clear reason, the
    others form their MPC world again (dealer included: a norm bound is on) with the restarted
    party, and the next rounds aggregate every client correctly."""
    import time

    from securecollab.launch import ProcessGroup, ensure_certs
    from securecollab.runs.training import start_clients, start_secagg_servers, wait_clients

    out = tmp_path / "secagg"
    out.mkdir()
    plan = FedAvgPlan(num_clients=3, rounds=3, local_epochs=1)
    # client-2 vanishes before its round-1 upload, so round 1 stays open for the deadline: a window
    # in which party 1 certainly holds a round-1 share and the round is not closed yet.
    spec = SecAggPlan(training=plan, n_parties=3, norm_bound=5.0, min_clients=2, upload_deadline_s=6,
                      party_recovery_s=180)
    clients = plan.client_ids()
    certs = ensure_certs(tmp_path / "certs", ["coordinator", "party-0", "party-1", "party-2", *clients])
    party_1 = out / "transcripts" / "party-1.jsonl"
    with ProcessGroup(out / "logs") as group:
        port = start_secagg_servers(group, spec, certs, out)
        start_clients(group, "secagg", clients, port, certs, out, {"client-2": ["--drop", "before_upload",
                                                                                 "--drop-round", "1"]})
        deadline = time.monotonic() + 300
        def holds_round_1_share() -> bool:
            try:
                return any(r.round == 1 for r in load_transcript(party_1).of_kind("share"))
            except (OSError, ValueError):  # not there yet, or a line being written
                return False

        while not holds_round_1_share():
            assert time.monotonic() < deadline, group.tail("coordinator")
            time.sleep(0.05)
        group.procs["party-1"].kill()
        group.procs["party-1"].wait()
        # Back at once, before the others know: it must not join their old (broken) world.
        group.restart("party-1")
        wait_clients(group, clients, may_fail={"client-2"})
        group.wait("coordinator", timeout=120)
    history = json.loads((out / "rounds_coordinator.json").read_text())["history"]
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    assert history[0]["included"] == clients
    assert "party-1" in history[1]["aborted"], history[1]
    assert history[2]["included"] == history[3]["included"] == ["client-0", "client-1"]
    rounds = aggregates(out)
    assert set(rounds) == {0, 2, 3}  # nothing revealed for the aborted round
    for r in (2, 3):
        included, aggregate = rounds[r]
        updates = replayed_updates(plan, out, r)
        np.testing.assert_allclose(aggregate, np.sum([updates[c] for c in included], axis=0),
                                   rtol=0, atol=10 * FIXED_POINT_STEP)
    # round 2 started from round 1's model: the aborted round changed nothing
    models = {r.round: r.tensors for r in load_transcript(out / "transcripts" / "client-0.jsonl").of_kind("global_model")}
    for name in models[1]:
        np.testing.assert_array_equal(models[1][name], models[2][name])
    # party 0 was restarted too (to form a new MPC world): its transcript kept the shares from before
    held_by_0 = {r.round for r in load_transcript(out / "transcripts" / "party-0.jsonl").of_kind("share")}
    assert {0, 2, 3} <= held_by_0
    lost = load_transcript(out / "transcripts" / "client-0.jsonl").of_kind("round_lost")
    assert [r.round for r in lost] in ([], [1])  # client-0 either reported before the abort or heard of it


def test_fault_coordinator_crash_at_each_step_resumes_without_losing_or_double_counting_shares(tmp_path):
    """The coordinator is crashed (failpoints) at three steps of three rounds and started again on its
    saved state each time: after all uploads were reported (round 0), after asking only party 0 for
    the aggregate (round 1), and after revealing the aggregate but before saving it (round 2).
    Every round still aggregates every client exactly once, each from the model the one before made,
    and no client uploads anything twice."""
    from securecollab.launch import ProcessGroup, ensure_certs
    from securecollab.net.failpoints import ENV, EXIT_FAILPOINT
    from securecollab.runs.training import start_clients, start_secagg_servers, wait_clients
    from securecollab.updates import apply_aggregate

    out = tmp_path / "secagg"
    out.mkdir()
    plan = FedAvgPlan(num_clients=3, rounds=4, local_epochs=1)
    spec = SecAggPlan(training=plan, n_parties=3, min_clients=2, upload_deadline_s=120)
    clients = plan.client_ids()
    certs = ensure_certs(tmp_path / "certs", ["coordinator", "party-0", "party-1", "party-2", *clients])
    crashes = ["coordinator.reports_closed@0", "coordinator.aggregate_sent_to_one@1", "coordinator.revealed@2"]
    with ProcessGroup(out / "logs") as group:
        port = start_secagg_servers(group, spec, certs, out, coordinator_env={ENV: crashes[0]})
        start_clients(group, "secagg", clients, port, certs, out)
        for armed_next in [*crashes[1:], ""]:
            code = group.procs["coordinator"].wait(timeout=300)
            assert code == EXIT_FAILPOINT, group.tail("coordinator")
            group.restart("coordinator", env={ENV: armed_next})
        wait_clients(group, clients)
        group.wait("coordinator", timeout=120)
        log = (out / "logs" / "coordinator.log").read_text()
    assert log.count("resuming from") == 3, log
    assert "round 1: asking the parties again" in log and "round 2: asking the parties again" in log
    history = json.loads((out / "rounds_coordinator.json").read_text())["history"]
    assert history == [{"round": r, "included": clients} for r in range(4)]
    revealed = load_transcript(out / "transcripts" / "coordinator.jsonl").of_kind("aggregate")
    # round 2 was revealed twice (before and after the crash): the parties gave the same shares again
    assert sorted(r.round for r in revealed) == [0, 1, 2, 2, 3]
    twice = [r.tensors["aggregate"] for r in revealed if r.round == 2]
    np.testing.assert_array_equal(twice[0], twice[1])
    models = {r.round: list(r.tensors.items())
              for r in load_transcript(out / "transcripts" / "client-0.jsonl").of_kind("global_model")}
    for r in range(4):
        included, aggregate = aggregates(out)[r]
        updates = replayed_updates(plan, out, r)
        np.testing.assert_allclose(aggregate, np.sum([updates[c] for c in clients], axis=0),
                                   rtol=0, atol=10 * FIXED_POINT_STEP)
        # the next round's model is this one's plus this aggregate, applied once
        for (name, got), (_, want) in zip(models[r + 1], apply_aggregate(models[r], aggregate)):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"round {r + 1} {name}")
    for party in ("party-0", "party-1", "party-2"):
        shares = [(r.round, r.sender) for r in load_transcript(out / "transcripts" / f"{party}.jsonl").of_kind("share")]
        assert sorted(shares) == sorted((r, c) for r in range(4) for c in clients), party
    for c in clients:
        assert not load_transcript(out / "transcripts" / f"{c}.jsonl").of_kind("round_lost")
