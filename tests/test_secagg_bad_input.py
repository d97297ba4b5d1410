"""Bad input against the secure-aggregation services (3 compute parties + coordinator, real processes).

Two clients' shares for round 0 are accepted first; then every kind of bad
request is sent, each must get its own status and message; then the round is
closed and the revealed model must be exactly what the two accepted updates
make: nothing accepted was lost or altered, and the services kept serving.
Shares are ring elements, so "wrong dtype / NaN" has no meaning at a party: any
8 bytes are a valid element. What can be wrong is the framing, checked here.
"""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest

from securecollab.generated.v1 import secagg_pb2 as pb
from securecollab.generated.v1 import secagg_pb2_grpc as pb_grpc
from securecollab.generated.v1 import tensor_pb2 as tensor_pb
from securecollab.launch import ProcessGroup, ensure_certs
from securecollab.net.certs import TlsFiles
from securecollab.net.transport import check_health, make_channel
from securecollab.net.wire import decode_named, encode_tensor, iter_chunks
from securecollab.plans import FedAvgPlan, SecAggPlan
from securecollab.runs.training import start_secagg_servers
from securecollab.secagg.sharing import Share, encode_fixed, split_shares, to_wire
from securecollab.transcript import Kind, load_transcript
from securecollab.updates import apply_aggregate
from services.secagg_client import share_messages

pytestmark = pytest.mark.slow
PARTIES = ["party-0", "party-1", "party-2"]


class Federation:
    """Servers running; `as_(party_id)` gives stubs presenting that party's certificate."""

    def __init__(self, group, certs, coordinator_port, plan):
        self.group, self.certs, self.plan = group, certs, plan
        self.coordinator_port = coordinator_port
        self.party_ports = [int((group.log_dir / f"{p}.port").read_text()) for p in PARTIES]
        self.channels: list[grpc.Channel] = []

    def channel(self, who: str, target_name: str, port: int, max_message_bytes: int | None = None):
        kw = {"max_message_bytes": max_message_bytes} if max_message_bytes else {}
        ch = make_channel(f"localhost:{port}", tls=TlsFiles.for_party(self.certs, who), server_name=target_name, **kw)
        self.channels.append(ch)
        return ch

    def party(self, who: str, index: int, **kw) -> pb_grpc.ComputePartyStub:
        return pb_grpc.ComputePartyStub(self.channel(who, PARTIES[index], self.party_ports[index], **kw))

    def coordinator(self, who: str) -> pb_grpc.CoordinatorStub:
        return pb_grpc.CoordinatorStub(self.channel(who, "coordinator", self.coordinator_port))

    def all_serving(self) -> bool:
        chans = [self.channel("coordinator", p, port) for p, port in zip(PARTIES, self.party_ports)]
        chans.append(self.channel("client-0", "coordinator", self.coordinator_port))
        return all(check_health(c) == "SERVING" for c in chans)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    work = tmp_path_factory.mktemp("secagg_bad")
    plan = FedAvgPlan(num_clients=3, rounds=2, local_epochs=1)
    # Fuzzed reports can close rounds below the minimum: each is aborted, so allow many.
    spec = SecAggPlan(training=plan, n_parties=3, seed_compression=False, min_clients=2, upload_deadline_s=3,
                      max_aborted_rounds=1000)
    # client-9 holds a valid certificate of the project CA but is not in the plan
    certs = ensure_certs(work / "certs", ["coordinator", *PARTIES, *plan.client_ids(), "client-9"])
    with ProcessGroup(work / "logs") as group:
        port = start_secagg_servers(group, spec, certs, work)
        fed = Federation(group, certs, port, spec)
        yield fed
        for ch in fed.channels:
            ch.close()


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def shares_of(vector: np.ndarray, bits: int = 32) -> list[Share]:
    """Dense shares in the ring of the federation's plan (a plain sum: Z_2^32)."""
    return split_shares(encode_fixed(vector), 3, compress=False, bits=bits)


def header(client_id="client-2", round_=0, party=0, length=4, seed=b""):
    return pb.ShareChunk(header=pb.ShareHeader(client_id=client_id, round=round_, party=party, length=length,
                                               seed=seed))


def chunks(payload: bytes, size: int = 64) -> list[pb.ShareChunk]:
    return [pb.ShareChunk(chunk=c) for c in iter_chunks(payload, chunk_bytes=size)]


def test_bad_input_to_parties_and_coordinator_gets_clear_statuses_and_loses_nothing(federation):
    fed = federation
    bits = fed.plan.share_bits
    assert bits == 32  # a plain sum: its shares travel in Z_2^32
    coord0 = fed.coordinator("client-0")
    start = coord0.GetRound(pb.RoundRequest(client_id="client-0", round=0), timeout=60)
    params0 = decode_named(start.params)
    size = sum(a.size for _, a in params0)
    rng = np.random.default_rng(7)
    accepted, sent = {}, {}
    for cid in ("client-0", "client-1"):  # two honest uploads, before any bad input
        vec = np.concatenate([rng.normal(0, 0.01, size), [1.0]])
        accepted[cid] = vec
        sent[cid] = shares_of(vec)
        for i, share in enumerate(sent[cid]):
            ack = fed.party(cid, i).SubmitShare(share_messages(cid, 0, share), timeout=60)
            assert ack.held == len(accepted)
    for i, share in enumerate(sent["client-0"]):  # the same upload again, as gRPC resends one whose answer was lost
        assert fed.party("client-0", i).SubmitShare(share_messages("client-0", 0, share), timeout=60).held == 2
    length = size + 1
    word = bits // 8
    good = to_wire(shares_of(np.zeros(length))[0].dense, bits)
    wide = to_wire(shares_of(np.zeros(length), 64)[0].dense, 64)  # 8-byte words: another ring than this plan's

    def tampered():
        msgs = chunks(good)
        bad = msgs[1].chunk
        msgs[1] = pb.ShareChunk(chunk=tensor_pb.Chunk(transfer_id=bad.transfer_id, seq=bad.seq, total=bad.total,
                                               total_bytes=bad.total_bytes, data=bytes(64), sha256=bad.sha256))
        return msgs

    p0 = fed.party("client-2", 0)
    big = fed.party("client-2", 0, max_message_bytes=64 << 20)
    as_client_0 = fed.party("client-0", 0)
    as_client_9 = fed.party("client-9", 0)
    party_cases = {
        "no header": (p0, chunks(good), grpc.StatusCode.INVALID_ARGUMENT, "header"),
        "empty stream": (p0, [], grpc.StatusCode.INVALID_ARGUMENT, "header"),
        "another client's id": (p0, [header("client-0", length=length), *chunks(good)],
                                grpc.StatusCode.PERMISSION_DENIED, "cannot act as|may not"),
        "unknown client": (as_client_9, [header("client-9", length=length), *chunks(good)],
                           grpc.StatusCode.NOT_FOUND, "unknown client"),
        "oversized declared length": (p0, [header(length=1 << 40)], grpc.StatusCode.RESOURCE_EXHAUSTED, "limit"),
        "oversized message": (big, [header(length=length), pb.ShareChunk(chunk=tensor_pb.Chunk(
            transfer_id="x", seq=0, total=1, total_bytes=20 << 20, data=bytes(20 << 20)))],
            grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
        "seed of wrong size": (p0, [header(length=length, seed=b"short")], grpc.StatusCode.INVALID_ARGUMENT, "seed"),
        "seed and chunks": (p0, [header(length=length, seed=bytes(32)), *chunks(good)],
                            grpc.StatusCode.INVALID_ARGUMENT, "seed"),
        "fewer elements than declared": (p0, [header(length=length), *chunks(good[:-word])],
                                         grpc.StatusCode.INVALID_ARGUMENT, "header says"),
        "words of the 64-bit ring": (p0, [header(length=length), *chunks(wide)], grpc.StatusCode.INVALID_ARGUMENT,
                                     "limit|exceed|header says"),
        "more bytes than declared": (p0, [header(length=length), *chunks(good + bytes(word))],
                                     grpc.StatusCode.INVALID_ARGUMENT, "limit|exceed"),
        "truncated transfer": (p0, [header(length=length), *chunks(good)[:-1]],
                               grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
        "out-of-order chunks": (p0, [header(length=length), *reversed(chunks(good))],
                                grpc.StatusCode.INVALID_ARGUMENT, "expected"),
        "duplicated chunk": (p0, [header(length=length), *(lambda c: [c[0], *c])(chunks(good))],
                             grpc.StatusCode.INVALID_ARGUMENT, "expected|declared"),
        "bad checksum": (p0, [header(length=length), *tampered()], grpc.StatusCode.INVALID_ARGUMENT, "checksum"),
        "share for another party": (p0, [header(party=1, length=length), *chunks(good)],
                                    grpc.StatusCode.INVALID_ARGUMENT, "party 1"),
        "length unlike the plan's": (p0, [header(length=length - 1), *chunks(good[:-word])],
                                     grpc.StatusCode.INVALID_ARGUMENT, "plan's update vectors"),
        # a first share of its own length must not fix the round's, so that every honest share is refused
        "a seed share of length 1": (p0, [header(round_=1, length=1, seed=bytes(32))],
                                     grpc.StatusCode.INVALID_ARGUMENT, "plan's update vectors have"),
        "a seed share of length 0": (p0, [header(round_=1, length=0, seed=bytes(32))],
                                     grpc.StatusCode.INVALID_ARGUMENT, "plan's update vectors have"),
        "a second, different share": (as_client_0, [header("client-0", length=length), *chunks(good)],
                                      grpc.StatusCode.ALREADY_EXISTS, "already sent .* different"),
    }
    for name, (stub, msgs, want, pattern) in party_cases.items():
        code, details = code_of(stub.SubmitShare, iter(msgs), timeout=60)
        assert code == want, (name, code, details)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED or (details and re.search(pattern, details)), (name, details)
    for method, req in (("Held", pb.HeldRequest(round=0)), ("Rejoin", pb.RejoinRequest(round=0, reason="x"))):
        code, details = code_of(getattr(p0, method), req, timeout=30)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "may not" in details, (method, code, details)
    code, details = code_of(lambda: list(p0.Aggregate(pb.AggregateRequest(round=0, client_ids=["client-0",
                                                                                                "client-1"]), timeout=30)))
    assert code == grpc.StatusCode.PERMISSION_DENIED, details

    coordinator_cases = {
        "another client's id": (fed.coordinator("client-2").Join, pb.SecAggJoinRequest(client_id="client-0"),
                                grpc.StatusCode.PERMISSION_DENIED),
        "unknown client": (fed.coordinator("client-9").Join, pb.SecAggJoinRequest(client_id="client-9"),
                           grpc.StatusCode.NOT_FOUND),
        "a party's certificate": (fed.coordinator("party-1").Join, pb.SecAggJoinRequest(client_id="client-2"),
                                  grpc.StatusCode.PERMISSION_DENIED),
        "report for a future round": (coord0.ReportUploaded, pb.UploadReport(client_id="client-0", round=5),
                                      grpc.StatusCode.FAILED_PRECONDITION),
        "wait for a round that will not come": (coord0.GetRound, pb.RoundRequest(client_id="client-0", round=99),
                                                grpc.StatusCode.DEADLINE_EXCEEDED),
    }
    for name, (method, req, want) in coordinator_cases.items():
        code, details = code_of(method, req, timeout=3)
        assert code == want and details, (name, code, details)

    # the coordinator's own aggregation request, malformed: refused before any share is used
    as_coordinator = fed.party("coordinator", 0)
    both = ["client-0", "client-1"]
    bad_requests = {
        "unknown robust rule": pb.AggregateRequest(round=0, client_ids=both, robust="krum"),
        "unknown norm mode": pb.AggregateRequest(round=0, client_ids=both, norm_bound=1.0, norm_mode="shrink"),
        "infinite DP noise": pb.AggregateRequest(round=0, client_ids=both, dp_sigma=float("inf")),
        "root update with NaN": pb.AggregateRequest(round=0, client_ids=both, robust="fltrust",
                                                    reference=encode_tensor(np.full(length - 1, np.nan))),
        "root update of the wrong length": pb.AggregateRequest(round=0, client_ids=both, robust="fltrust",
                                                               reference=encode_tensor(np.ones(length - 2))),
        "root update as int64": pb.AggregateRequest(round=0, client_ids=both, robust="fltrust",
                                                    reference=encode_tensor(np.ones(length - 1, np.int64))),
    }
    for name, req in bad_requests.items():
        code, details = code_of(lambda: list(as_coordinator.Aggregate(req, timeout=30)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details, (name, code, details)
    # a rule computed inside MPC needs CrypTen's 64-bit ring; this plan's shares are residues mod 2^32
    for rule in ({"norm_bound": 1.0}, {"dp_sigma": 0.1}):
        code, details = code_of(lambda: list(as_coordinator.Aggregate(
            pb.AggregateRequest(round=0, client_ids=both, **rule), timeout=30)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "Z_2^32" in details, (rule, code, details)

    # nothing accepted was lost: every party still holds exactly the two honest shares
    for i in range(3):
        held = fed.party("coordinator", i).Held(pb.HeldRequest(round=0), timeout=30)
        assert list(held.client_ids) == ["client-0", "client-1"]
    assert fed.all_serving()
    # a replayed report is one report; the round closes at the deadline without client-2
    assert coord0.ReportUploaded(pb.UploadReport(client_id="client-0", round=0), timeout=30).reported == 1
    assert coord0.ReportUploaded(pb.UploadReport(client_id="client-0", round=0), timeout=30).reported == 1
    coord1 = fed.coordinator("client-1")
    assert coord1.ReportUploaded(pb.UploadReport(client_id="client-1", round=0), timeout=30).reported == 2
    nxt = coord0.GetRound(pb.RoundRequest(client_id="client-0", round=1), timeout=120)
    assert nxt.round == 1
    want = apply_aggregate(params0, accepted["client-0"] + accepted["client-1"])
    got = dict(decode_named(nxt.params))
    for name, w in want:  # nothing altered: exactly the two accepted updates, averaged
        np.testing.assert_allclose(got[name], w, rtol=0, atol=4 * 2.0 ** -16, err_msg=name)
    # each party recorded client-0's share once, the one first sent (the resent copy is not a second record)
    for i, share in enumerate(sent["client-0"]):
        records = [r for r in load_transcript(fed.group.log_dir.parent / "transcripts" / f"party-{i}.jsonl"
                                              ).of_kind(Kind.SHARE) if r.sender == "client-0" and r.round == 0]
        assert len(records) == 1 and np.array_equal(records[0].tensors["share"], share.dense)
    # round 0 is closed now: a late share or report for it is stale
    stale = shares_of(np.zeros(length))[0]
    code, details = code_of(lambda: p0.SubmitShare(share_messages("client-2", 0, stale), timeout=30))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "already aggregated" in details
    coord2 = fed.coordinator("client-2")
    code, details = code_of(lambda: coord2.ReportUploaded(pb.UploadReport(client_id="client-2", round=0), timeout=30))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "current is 1" in details
    # a counted client's report repeated late (as after a coordinator restart) is answered, counted once
    assert coord0.ReportUploaded(pb.UploadReport(client_id="client-0", round=0), timeout=30).reported == 2
    assert fed.all_serving()
    assert all(fed.group.procs[p].poll() is None for p in [*PARTIES, "coordinator"])


def current_round(fed) -> tuple[int, list]:
    info = fed.coordinator("client-0").GetRound(pb.RoundRequest(client_id="client-0", round=0), timeout=60)
    return info.round, decode_named(info.params)


def test_dropout_below_the_minimum_aborts_that_round_and_training_goes_on(federation):
    """Only client-2 uploads and reports: the round cannot reach 2 clients, so it is aborted (its
    share is never aggregated alone) and the next round starts from the same model."""
    fed = federation
    r, params = current_round(fed)
    size = sum(a.size for _, a in params)
    for i, share in enumerate(shares_of(np.concatenate([np.full(size, 0.01), [1.0]]))):
        fed.party("client-2", i).SubmitShare(share_messages("client-2", r, share), timeout=60)
    coord2 = fed.coordinator("client-2")
    coord2.ReportUploaded(pb.UploadReport(client_id="client-2", round=r), timeout=30)
    nxt = coord2.GetRound(pb.RoundRequest(client_id="client-2", round=r + 1), timeout=120)
    assert nxt.round == r + 1 and not nxt.done
    for (name, before), (_, after) in zip(params, decode_named(nxt.params)):
        np.testing.assert_array_equal(before, after, err_msg=name)
    code, details = code_of(coord2.ReportUploaded, pb.UploadReport(client_id="client-2", round=r), timeout=30)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and f"current is {r + 1}" in details
    assert fed.all_serving()


def test_fuzz_parties_and_coordinator_with_random_messages(federation):
    """Random well-formed and raw messages to every method of both services, as a client (and as the
    coordinator for a party's Held): never UNKNOWN, always a message, and still serving correctly."""
    from securecollab.generated.v1 import secagg_pb2
    from tests.service_fuzz import fuzz_raw, fuzz_service

    fed = federation
    ids = ["client-0", "client-1", "client-2", "client-9", "party-0", "coordinator"]
    party_service = secagg_pb2.DESCRIPTOR.services_by_name["ComputeParty"]
    coordinator_service = secagg_pb2.DESCRIPTOR.services_by_name["Coordinator"]

    def parties_still_answer(_channel) -> None:
        for i in range(3):
            held = fed.party("coordinator", i).Held(pb.HeldRequest(round=0), timeout=30)
            assert set(held.client_ids) <= {"client-0", "client-1", "client-2"}

    def coordinator_still_answers(_channel) -> None:
        r, params = current_round(fed)
        assert r >= 0 and [n for n, _ in params]

    as_client = fed.channel("client-2", "party-0", fed.party_ports[0])
    report = fuzz_service(as_client, party_service, max_examples=40, strings=ids, valid_after=parties_still_answer)
    assert "PERMISSION_DENIED" in report.codes("Aggregate") and "PERMISSION_DENIED" in report.codes("Rejoin")
    # some random shares got past identity to the framing checks
    assert report.codes("SubmitShare") - {"PERMISSION_DENIED", "NOT_FOUND"}, report.counts
    fuzz_raw(as_client, party_service, max_examples=20, valid_after=parties_still_answer)
    # as the coordinator: Held only (a random Aggregate that matched held shares would start an MPC
    # on one party, and Rejoin restarts the party: both are the coordinator's to call)
    as_coordinator = fed.channel("coordinator", "party-1", fed.party_ports[1])
    fuzz_service(as_coordinator, party_service, max_examples=30, strings=ids,
                 skip_methods={"SubmitShare", "Aggregate", "Rejoin"}, valid_after=parties_still_answer)
    coord = fed.channel("client-2", "coordinator", fed.coordinator_port)
    blocking = {"GetRound": {grpc.StatusCode.DEADLINE_EXCEEDED}}
    report = fuzz_service(coord, coordinator_service, max_examples=40, strings=ids, timeouts={"GetRound": 0.5},
                          extra_allowed=blocking, valid_after=coordinator_still_answers)
    assert "OK" in report.codes("Join")
    fuzz_raw(coord, coordinator_service, max_examples=20, timeouts={"GetRound": 0.5},
             valid_after=coordinator_still_answers)
    assert all(fed.group.procs[p].poll() is None for p in [*PARTIES, "coordinator"])
