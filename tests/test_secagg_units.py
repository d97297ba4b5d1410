"""Secure aggregation state machines: what a party accepts, when a round counts, how updates become vectors."""

import numpy as np
import pytest

from securecollab.errors import ProtocolError
from securecollab.plans import FedAvgPlan, SecAggPlan
from securecollab.protocols.secagg import SecAggRounds, ShareStore
from securecollab.secagg.sharing import Share, decode_fixed, encode_fixed, reconstruct, split_shares
from securecollab.updates import apply_aggregate, update_vector


def _share(party=0, n=4, value=1):
    return Share(party=party, dense=np.full(n, value, np.int64))


def test_store_refuses_unknown_client_wrong_party_duplicate_and_stale_round():
    store = ShareStore(0, ["client-0", "client-1"])
    assert store.put("client-0", 0, _share()) == (1, True)
    cases = [("client-9", 0, _share(), "NOT_FOUND"),
             ("client-1", 0, _share(party=1), "INVALID_ARGUMENT"),
             ("client-0", 0, _share(value=7), "ALREADY_EXISTS"),
             ("client-1", 0, _share(n=5), "INVALID_ARGUMENT")]
    for client, round_, share, code in cases:
        with pytest.raises(ProtocolError) as e:
            store.put(client, round_, share)
        assert e.value.code == code
    store.put("client-1", 0, _share(value=2))
    taken = store.take(0, ["client-1", "client-0"])
    assert [int(t[0]) for t in taken] == [2, 1]  # in the order asked, first submission kept
    with pytest.raises(ProtocolError) as e:
        store.put("client-0", 0, _share())
    assert e.value.code == "FAILED_PRECONDITION"  # round 0 is closed: a replay is refused


@pytest.mark.parametrize("seeded", [False, True])
def test_store_takes_the_very_share_it_holds_again_and_refuses_any_other(seeded):
    """An upload whose answer was lost comes again, bit for bit: acknowledged, held once. Another share from
    that client (a restarted client's fresh sharing) is refused, and the first stays."""
    def share(b):
        return Share(party=1, seed=bytes([b]) * 32, length=4) if seeded else _share(party=1, value=b)
    store = ShareStore(1, ["client-0", "client-1"])
    assert store.put("client-0", 2, share(5)) == (1, True)
    assert store.put("client-0", 2, share(5)) == (1, False)
    with pytest.raises(ProtocolError, match="a different one") as e:
        store.put("client-0", 2, share(6))
    assert e.value.code == "ALREADY_EXISTS"
    with pytest.raises(ProtocolError) as e:  # the same bytes for another length is not the same share
        store.put("client-0", 2, Share(party=1, seed=bytes([5]) * 32, length=5) if seeded
                  else _share(party=1, n=5, value=5))
    assert e.value.code in ("ALREADY_EXISTS", "INVALID_ARGUMENT")
    assert store.put("client-1", 2, share(7)) == (2, True)
    (first, _other) = store.take(2, ["client-0", "client-1"])
    assert np.array_equal(first, share(5).expand())


def test_store_takes_only_the_plans_length_and_a_few_open_rounds_per_client():
    """One client must neither fix a round's length (every honest share would be refused) nor fill the party's
    memory with shares for rounds to come."""
    store = ShareStore(0, ["client-0", "client-1"], min_clients=1, length=4, rounds_per_client=2)
    for share in (_share(n=5), _share(n=1), Share(party=0, seed=bytes(32), length=0),
                  Share(party=0, seed=bytes(32), length=1)):
        with pytest.raises(ProtocolError, match="update vectors have 4") as e:
            store.put("client-1", 0, share)
        assert e.value.code == "INVALID_ARGUMENT"
    assert store.held(0) == []
    assert store.put("client-0", 1, _share()) == (1, True)
    assert store.put("client-0", 2, _share()) == (1, True)
    with pytest.raises(ProtocolError, match="rounds not yet aggregated .1, 2.") as e:
        store.put("client-0", 3, _share())
    assert e.value.code == "RESOURCE_EXHAUSTED"
    assert store.put("client-0", 2, _share()) == (1, False)  # its share sent again is still taken
    assert store.put("client-1", 3, _share()) == (1, True)   # the limit is the client's, not the round's
    store.take(1, ["client-0"])
    assert store.put("client-0", 3, _share()) == (2, True)


def test_a_party_knows_the_update_length_from_the_plan_or_says_it_cannot(tmp_path, caplog):
    from services.secagg_party import _update_length
    plan = SecAggPlan(training=FedAvgPlan(num_clients=2))
    model = plan.training.build_model()
    assert _update_length(plan) == sum(p.numel() for p in model.parameters()) + 1
    assert _update_length(SecAggPlan(training=FedAvgPlan(num_clients=2, vector_length=101))) == 101
    elsewhere = SecAggPlan(training=FedAvgPlan(num_clients=2, dataset="npz", dataset_path=str(tmp_path / "no.npz")))
    assert _update_length(elsewhere) is None and "shares of any length" in caplog.text


def test_store_take_refuses_a_client_it_does_not_hold():
    store = ShareStore(0, ["client-0", "client-1"])
    store.put("client-0", 3, _share())
    with pytest.raises(ProtocolError, match="client-1"):
        store.take(3, ["client-0", "client-1"])
    assert store.held(3) == ["client-0"]  # nothing lost by the refused request


def test_round_counts_only_clients_every_party_holds_and_enforces_minimum():
    rounds = SecAggRounds(SecAggPlan(training=FedAvgPlan(num_clients=4), min_clients=2), [])
    assert rounds.include([{"client-0", "client-1", "client-2"}, {"client-0", "client-2"},
                           {"client-2", "client-0", "client-3"}]) == ["client-0", "client-2"]
    with pytest.raises(ProtocolError) as e:
        rounds.include([{"client-0"}, {"client-0", "client-1"}, {"client-1"}])
    assert e.value.code == "FAILED_PRECONDITION"


def test_average_through_shared_vectors_equals_mean_of_client_models():
    rng = np.random.default_rng(0)
    g = [("w", rng.normal(size=(3, 2)).astype(np.float32)), ("b", rng.normal(size=2).astype(np.float32))]
    clients = [[(n, a + rng.normal(size=a.shape).astype(np.float32)) for n, a in g] for _ in range(3)]
    shared = [reconstruct(split_shares(encode_fixed(update_vector(p, g)), 3)) for p in clients]
    total = shared[0]
    for s in shared[1:]:
        total = reconstruct([total, s])  # wrap-around sum, as the parties' shares add up
    new = dict(apply_aggregate(g, decode_fixed(total)))
    expected = np.mean([dict(c)["w"] for c in clients], axis=0)
    np.testing.assert_allclose(new["w"], expected, atol=1e-4)


def test_plan_round_trips_through_json():
    plan = SecAggPlan(training=FedAvgPlan(num_clients=7, rounds=3), n_parties=2, norm_bound=1.5)
    assert SecAggPlan.from_json(plan.to_json()) == plan
    assert plan.needs_dealer and not SecAggPlan().needs_dealer


def test_bad_input_party_refuses_to_aggregate_one_client_alone_a_repeated_client_or_a_round_twice():
    """A curious coordinator cannot isolate one update: not alone, not by differencing two sums."""
    store = ShareStore(0, ["client-0", "client-1", "client-2"], min_clients=2)
    for c in ("client-0", "client-1", "client-2"):
        store.put(c, 4, _share())
    for ids, code in ((["client-1"], "FAILED_PRECONDITION"), (["client-1", "client-1"], "INVALID_ARGUMENT")):
        with pytest.raises(ProtocolError) as e:
            store.take(4, ids)
        assert e.value.code == code
    assert store.held(4) == ["client-0", "client-1", "client-2"]  # refusals lose nothing
    assert len(store.take(4, ["client-0", "client-1", "client-2"])) == 3
    with pytest.raises(ProtocolError) as e:  # the round is closed: no second, smaller sum
        store.take(4, ["client-0", "client-1"])
    assert e.value.code == "FAILED_PRECONDITION"


def test_fault_saved_rounds_survive_a_restart_and_refuse_another_plan(tmp_path):
    from securecollab.protocols.round_store import RoundStore

    plan = SecAggPlan(training=FedAvgPlan(num_clients=3, rounds=5))
    initial = [("w", np.zeros((2, 2), np.float32)), ("b", np.zeros(2, np.float32))]
    path = tmp_path / "state.sqlite"
    first = SecAggRounds(plan, initial, RoundStore(path, plan.to_json()))
    assert not first.resumed
    step = [("w", np.full((2, 2), 0.5, np.float32)), ("b", np.array([1.0, -1.0], np.float32))]
    first.advance(step, ["client-0", "client-1"])
    first.report("client-2", 1)
    first.report("client-2", 1)  # a repeated report is one report
    first.report("client-0", 1)
    first.set_closing(["client-0", "client-2"])
    # a new process on the same file: round 1 open, its reports and its aggregation request kept
    again = SecAggRounds(plan, initial, RoundStore(path, plan.to_json()))
    assert again.resumed and again.round == 1 and again.reported == {"client-0", "client-2"}
    assert again.closing == {"round": 1, "included": ["client-0", "client-2"]}
    assert [n for n, _ in again.params] == ["w", "b"]
    for (_, got), (_, want) in zip(again.params, step):
        np.testing.assert_array_equal(got, want)
    assert again.history == [{"round": 0, "included": ["client-0", "client-1"]}]
    # a report repeated after the restart for a round that counted the client is answered, not lost
    assert again.report("client-1", 0) == 2
    with pytest.raises(ProtocolError, match="report for round 0, current is 1"):
        again.report("client-2", 0)  # client-2 was not counted in round 0
    assert again.reported == {"client-0", "client-2"}
    assert again.first_report_at is not None  # the upload deadline runs on from before the restart
    again.abort("party-1 is unreachable")
    third = SecAggRounds(plan, initial, RoundStore(path, plan.to_json()))
    assert third.abort_reason == "party-1 is unreachable" and third.closing is None and third.aborted == 1
    third.reopen()
    assert SecAggRounds(plan, initial, RoundStore(path, plan.to_json())).round == 2
    other = SecAggPlan(training=FedAvgPlan(num_clients=3, rounds=6))
    with pytest.raises(ProtocolError, match="another training") as e:
        SecAggRounds(other, initial, RoundStore(path, other.to_json()))
    assert e.value.code == "FAILED_PRECONDITION"


def test_saving_the_closing_request_does_not_rewrite_the_model(tmp_path):
    """The closing request is saved on the critical path of every round; in the model's row it rewrote the whole
    model (4 MB at D = 10^6, ~50 ms). Now it writes a few pages of the write-ahead log."""
    import sqlite3

    from securecollab.protocols.round_store import RoundStore

    plan = SecAggPlan(training=FedAvgPlan(num_clients=3, rounds=5))
    initial = [("w", np.random.default_rng(0).random(1_000_000).astype(np.float32))]
    path = tmp_path / "state.sqlite"
    rounds = SecAggRounds(plan, initial, RoundStore(path, plan.to_json()))
    rounds.store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    wal = path.with_name(path.name + "-wal")
    assert wal.stat().st_size == 0
    rounds.set_closing(["client-0", "client-1"])
    assert 0 < wal.stat().st_size < 64 << 10
    assert SecAggRounds(plan, initial, RoundStore(path, plan.to_json())).closing["included"] == ["client-0", "client-1"]
    # a state file of the version that kept the request in the model's row: the request moves out, kept
    old = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # the same state in the old layout
        db.execute("ATTACH ? AS old", (str(old),))
        db.execute("CREATE TABLE old.training (id INTEGER PRIMARY KEY CHECK (id = 0), plan TEXT NOT NULL, "
                   "round INTEGER NOT NULL, aborted INTEGER NOT NULL, abort_reason TEXT, closing TEXT, "
                   "history TEXT NOT NULL, aggregated_at TEXT NOT NULL, params BLOB NOT NULL)")
        db.execute("INSERT INTO old.training SELECT t.id, t.plan, t.round, t.aborted, t.abort_reason, c.request, "
                   "t.history, t.aggregated_at, t.params FROM training t, closing c")
    resumed = SecAggRounds(plan, initial, RoundStore(old, plan.to_json()))
    assert resumed.resumed and resumed.closing["included"] == ["client-0", "client-1"]
    np.testing.assert_array_equal(resumed.params[0][1], initial[0][1])
    resumed.set_closing(["client-1", "client-2"])  # and it is written where it now lives
    assert SecAggRounds(plan, initial, RoundStore(old, plan.to_json())).closing["included"] == ["client-1", "client-2"]


def test_bad_input_party_answers_a_repeated_aggregation_alike_and_refuses_a_different_one():
    """A restarted coordinator may ask again for a round's aggregate: the same request gets the same
    MPC job (same result shares, no fresh noise); a different client list for that round is refused."""
    import queue

    from securecollab.generated.v1 import secagg_pb2 as pb
    from securecollab.transcript import TranscriptRecorder
    from services.secagg_party import ComputePartyServicer

    store = ShareStore(0, ["client-0", "client-1", "client-2"], min_clients=2)
    for c in ("client-0", "client-1", "client-2"):
        store.put(c, 4, _share())
    jobs: queue.Queue = queue.Queue()
    party = ComputePartyServicer(0, store, jobs, TranscriptRecorder(None, party="party-0", role="party"), 64)
    ask = pb.AggregateRequest(round=4, client_ids=["client-0", "client-1"], dp_sigma=0.5)
    job = party._job_for(ask)
    assert party._job_for(pb.AggregateRequest(round=4, client_ids=["client-0", "client-1"], dp_sigma=0.5)) is job
    assert jobs.qsize() == 1  # one MPC run for both
    for other in (["client-0", "client-2"], ["client-0", "client-1", "client-2"]):
        with pytest.raises(ProtocolError, match="another aggregation") as e:
            party._job_for(pb.AggregateRequest(round=4, client_ids=other, dp_sigma=0.5))
        assert e.value.code == "FAILED_PRECONDITION"
    with pytest.raises(ProtocolError):  # same clients, other noise: also a second aggregation
        party._job_for(pb.AggregateRequest(round=4, client_ids=["client-0", "client-1"], dp_sigma=0.0))
    assert jobs.qsize() == 1


def test_asynchronous_wait_for_a_round_is_woken_by_the_driver_thread_and_keeps_deadline_and_abort():
    """GetRound waits as a task: woken when another thread opens the round (clients learn which), refused
    DEADLINE_EXCEEDED when the round does not come in time, ABORTED when training fails while it waits."""
    import asyncio
    import threading

    plan = SecAggPlan(training=FedAvgPlan(num_clients=2, rounds=2, vector_length=3), n_parties=3, min_clients=1)
    rounds = SecAggRounds(plan, [("w", np.zeros(3, np.float32))])

    async def scenario():
        waiters = [asyncio.create_task(rounds.wait_for_round_async(1, timeout=10.0)) for _ in range(20)]
        await asyncio.sleep(0.1)
        assert not any(w.done() for w in waiters)
        woken = []  # a waiter of round 1 beside the tasks: a report must not wake it, the new round must
        with rounds._cond:
            rounds._waiting[1].add(lambda: woken.append(1))
        rounds.report("client-0", 0)
        assert woken == []
        opener = threading.Timer(0.2, rounds.advance, args=([("w", np.ones(3, np.float32))], ["client-0"]))
        opener.start()
        results = await asyncio.gather(*waiters)
        assert woken == [1]
        with rounds._cond:
            rounds._waiting.pop(1, None)
        assert {(r, done) for r, done, _ in results} == {(1, False)}
        assert all(np.array_equal(dict(p)["w"], np.ones(3)) for _, _, p in results)
        with pytest.raises(ProtocolError, match="not reached in time") as late:
            await rounds.wait_for_round_async(2, timeout=0.2)
        assert late.value.code == "DEADLINE_EXCEEDED"
        failing = asyncio.create_task(rounds.wait_for_round_async(2, timeout=10.0))
        threading.Timer(0.2, rounds.fail, args=("party-1 is gone",)).start()
        with pytest.raises(ProtocolError, match="party-1 is gone") as aborted:
            await failing
        assert aborted.value.code == "ABORTED"
        assert not rounds._waiting  # no waiter left registered

    asyncio.run(scenario())


def test_only_a_plain_sum_travels_in_the_32_bit_ring():
    plan = FedAvgPlan(num_clients=10)
    assert SecAggPlan(training=plan).share_bits == 32
    assert SecAggPlan(training=FedAvgPlan(num_clients=1 << 15)).share_bits == 64  # a count of 1 each would wrap
    for spec in (SecAggPlan(training=plan, norm_bound=1.0), SecAggPlan(training=plan, dp_sigma=0.1),
                 SecAggPlan(training=plan, robust="fltrust"), SecAggPlan(training=plan, narrow_ring=False)):
        assert spec.share_bits == 64, spec  # CrypTen's ring: the rule runs inside MPC (or the user asked)


def test_an_honest_client_refuses_an_update_the_32_bit_sum_could_wrap_and_a_malicious_one_sends_it():
    from services.secagg_client import upload

    class Party:
        def __init__(self):
            self.words = []

        def SubmitShare(self, messages, **_):
            self.words.append(sum(len(m.chunk.data) for m in messages if m.WhichOneof("part") == "chunk"))

    spec = SecAggPlan(training=FedAvgPlan(num_clients=10), seed_compression=False)
    parties = [Party() for _ in range(3)]
    with pytest.raises(ValueError, match="narrow_ring"):
        upload("client-0", 0, np.array([0.1, 3276.8 - 2.0 ** -20, 1.0]), parties, spec)  # rounds up to 2^15 / 10
    assert all(not p.words for p in parties)  # nothing sent
    upload("client-0", 0, np.array([0.1, 3276.7, 1.0]), parties, spec)
    upload("client-0", 1, np.array([0.1, 1e6, 1.0]), parties, spec, honest=False)
    assert [p.words for p in parties] == [[12, 12]] * 3  # 4-byte words
