"""Bad input against the plain FedAvg aggregator: each refusal has its status and message, and what was
already accepted still counts, unchanged, in the aggregate. Plus fuzzing of every method.

The aggregator runs in process (as in test_fedavg.py) over mutual TLS on loopback; clients are
plain stubs so each request can be malformed on purpose. Covered already in test_fedavg.py (not
repeated here): NaN and wrong-shape updates, client-0's certificate acting as client-1, an unknown
client in SubmitUpdate, a duplicate submission's status, and a client of another CA.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import strategies as st

from securecollab.generated.v1 import fedavg_pb2 as pb
from securecollab.generated.v1 import fedavg_pb2_grpc as pb_grpc
from securecollab.generated.v1 import tensor_pb2
from securecollab.net.certs import TlsFiles
from securecollab.net.transport import check_health, make_channel
from securecollab.net.wire import encode_named, encode_tensor
from securecollab.plans import FedAvgPlan
from services.fedavg_aggregator import serve
from tests.service_fuzz import fuzz_raw, fuzz_service, lax_channel, refusal, same_ca_certs

SC = grpc.StatusCode
SERVICE = pb.DESCRIPTOR.services_by_name["FedAvgAggregator"]


@pytest.fixture
def aggregator(tls_for):
    """(server, rounds, stubs): a 2-client, 2-round aggregator and a stub per client certificate."""
    server, rounds, _ = serve(FedAvgPlan(num_clients=2, rounds=2), tls=tls_for("aggregator"), host="127.0.0.1",
                              block=False)
    channels = {c: make_channel(f"localhost:{server.port}", tls=tls_for(c)) for c in ("client-0", "client-1")}
    yield server, rounds, {c: pb_grpc.FedAvgAggregatorStub(ch) for c, ch in channels.items()}
    for ch in channels.values():
        ch.close()
    server.stop(grace=None)


def _update(rounds, value: float, dtype=np.float32):
    return [(n, np.full(s, value, dtype)) for n, s in rounds.shapes.items()]


def _submit(stub, client, params, *, round_=0, n=1):
    if params and isinstance(params[0], tuple):
        params = encode_named(params)
    return stub.SubmitUpdate(pb.ClientUpdate(client_id=client, round=round_, num_examples=n, params=params),
                             timeout=10)


def _model(stub, client, round_):
    reply = stub.GetModel(pb.ModelRequest(client_id=client, round=round_), timeout=10)
    assert reply.round == round_
    return {t.name: np.frombuffer(t.tensor.data, np.float32).reshape(tuple(t.tensor.shape)) for t in reply.params}


def _assert_all(model: dict, value: float):
    for name, array in model.items():
        np.testing.assert_allclose(array, value, rtol=1e-6, err_msg=name)


def _named(rounds, **changes):
    """The good update (all 3.0) as messages, with one tensor's message replaced or changed."""
    msgs = encode_named(_update(rounds, 3.0))
    first = msgs[0]
    for key, value in changes.items():
        if key == "drop":
            msgs = msgs[1:]
        elif key == "extra":
            msgs.append(tensor_pb2.NamedTensor(name="extra.weight", tensor=encode_tensor(np.zeros(2, np.float32))))
        elif key == "duplicate":
            msgs.append(msgs[0])
        elif key == "tensor":
            first.tensor.CopyFrom(value(first.tensor))
    return msgs


def _dtype(dtype):
    return lambda rounds: encode_named(_update(rounds, 3, dtype))


def _special(value):
    def make(rounds):
        params = _update(rounds, 3.0)
        params[-1][1].flat[-1] = value
        return encode_named(params)
    return make


def _changed(**fields):
    def change(t):
        t = tensor_pb2.Tensor(dtype=t.dtype, shape=list(t.shape), data=t.data)
        for k, v in fields.items():
            if k == "shape":
                old = list(t.shape)
                del t.shape[:]
                t.shape.extend(v(old) if callable(v) else v)
            else:
                setattr(t, k, v(t) if callable(v) else v)
        return t
    return lambda rounds: _named(rounds, tensor=change)


BAD_UPDATES = {
    # name: (make the params messages, message fragment)
    "float64": (_dtype(np.float64), "expected dtype float32, got float64"),
    "float16": (_dtype(np.float16), "expected dtype float32, got float16"),
    "int64": (_dtype(np.int64), "expected dtype float32, got int64"),
    "bool": (_dtype(np.bool_), "expected dtype float32, got bool"),
    "inf": (_special(np.inf), "NaN or Inf"),
    "minus-inf": (_special(-np.inf), "NaN or Inf"),
    "one-nan": (_special(np.nan), "NaN or Inf"),
    "missing-tensor": (lambda r: _named(r, drop=True), "missing tensors"),
    "unexpected-tensor": (lambda r: _named(r, extra=True), "unexpected tensor 'extra.weight'"),
    "duplicate-tensor": (lambda r: _named(r, duplicate=True), "duplicate tensor name"),
    "data-shorter-than-declared": (_changed(data=lambda t: t.data[:-4]), "needs"),
    "data-longer-than-declared": (_changed(data=lambda t: t.data + bytes(4)), "needs"),
    "negative-dim": (_changed(shape=lambda s: [-s[0], *s[1:]]), "negative dimension"),
    "extra-dim": (_changed(shape=lambda s: [*s, 1]), "expected shape"),
    "unknown-dtype-code": (_changed(dtype=42), "unknown dtype code 42"),
    "huge-shape": (_changed(shape=[2**62, 2**62]), "exceeds the limit"),
}


@pytest.mark.parametrize("bad", list(BAD_UPDATES))
def test_bad_input_fedavg_refused_update_leaves_accepted_ones_in_the_aggregate(aggregator, bad):
    _, rounds, stubs = aggregator
    assert _submit(stubs["client-0"], "client-0", _update(rounds, 1.0), n=1).received == 1
    make, fragment = BAD_UPDATES[bad]
    code, details = refusal(_submit, stubs["client-1"], "client-1", make(rounds), n=3)
    assert code == SC.INVALID_ARGUMENT and fragment in details, (code, details)
    # the refused update was not counted, the accepted one was kept: the round closes on client-1's good one
    ack = _submit(stubs["client-1"], "client-1", _update(rounds, 3.0), n=3)
    assert (ack.round, ack.received) == (0, 2)
    _assert_all(_model(stubs["client-0"], "client-0", 1), (1 * 1.0 + 3 * 3.0) / 4)


def test_bad_input_fedavg_stale_replayed_and_duplicate_rounds_change_nothing(aggregator):
    _, rounds, stubs = aggregator
    c0, c1 = stubs["client-0"], stubs["client-1"]
    _submit(c0, "client-0", _update(rounds, 1.0))
    code, details = refusal(_submit, c0, "client-0", _update(rounds, 100.0))
    assert code == SC.ALREADY_EXISTS and "already submitted round 0" in details
    code, details = refusal(_submit, c0, "client-0", _update(rounds, 100.0), round_=1)  # a round from the future
    assert code == SC.FAILED_PRECONDITION and "current round is 0" in details
    _submit(c1, "client-1", _update(rounds, 3.0), n=3)
    _assert_all(_model(c0, "client-0", 1), 2.5)  # the duplicate did not replace the first update
    # round 0 is over: replaying it is stale, and does not count towards round 1
    code, details = refusal(_submit, c0, "client-0", _update(rounds, 1.0), round_=0)
    assert code == SC.FAILED_PRECONDITION and "update for round 0, current round is 1" in details
    code, details = refusal(_submit, c1, "client-1", _update(rounds, 1.0), round_=2**32 - 1)
    assert code == SC.FAILED_PRECONDITION
    assert _submit(c0, "client-0", _update(rounds, 2.0), round_=1).received == 1
    _assert_all(_model(c1, "client-1", 1), 2.5)
    assert _submit(c1, "client-1", _update(rounds, 4.0), round_=1, n=1).received == 2
    final = c0.GetModel(pb.ModelRequest(client_id="client-0", round=2), timeout=10)
    assert final.done and final.round == 2
    _assert_all({t.name: np.frombuffer(t.tensor.data, np.float32) for t in final.params}, 3.0)
    # training is over: any further update is refused
    code, details = refusal(_submit, c0, "client-0", _update(rounds, 1.0), round_=2)
    assert code == SC.FAILED_PRECONDITION and "training is finished" in details


def test_bad_input_fedavg_unknown_clients_and_foreign_certificates_are_refused(aggregator, tls_for, cert_dir,
                                                                              tmp_path):
    server, rounds, stubs = aggregator
    target = f"localhost:{server.port}"
    # client-0's id, but a compute party's certificate (same CA)
    party_dir = same_ca_certs(cert_dir, tmp_path / "certs", ["client-0:party"])
    good = encode_named(_update(rounds, 5.0))
    calls = {
        "Join": lambda stub, cid: stub.Join(pb.JoinRequest(client_id=cid), timeout=10),
        "GetModel": lambda stub, cid: stub.GetModel(pb.ModelRequest(client_id=cid, round=0), timeout=10),
        "SubmitUpdate": lambda stub, cid: _submit(stub, cid, good),
    }
    with make_channel(target, tls=tls_for("server")) as party_ch, \
            make_channel(target, tls=tls_for("aggregator")) as agg_ch, \
            make_channel(target, tls=TlsFiles.for_party(party_dir, "client-0"), server_name="localhost") as same_id:
        foreign = {"client-1's certificate": stubs["client-1"],
                   "a party certificate": pb_grpc.FedAvgAggregatorStub(party_ch),
                   "the aggregator's own certificate": pb_grpc.FedAvgAggregatorStub(agg_ch)}
        for method, call in calls.items():
            for cid in ("client-9", "", "client-0/../client-1", "CLIENT-0"):
                code, details = refusal(call, stubs["client-0"], cid)
                assert code == SC.NOT_FOUND and "unknown client" in details, (method, cid, code)
            for who, stub in foreign.items():
                code, details = refusal(call, stub, "client-0")
                assert code == SC.PERMISSION_DENIED and "cannot act as 'client-0'" in details, (method, who)
            code, details = refusal(call, pb_grpc.FedAvgAggregatorStub(same_id), "client-0")
            assert code == SC.PERMISSION_DENIED and "a certificate of role 'party' cannot act as client 'client-0'" in details
    # none of those updates was counted: client-0's own is the first of the round
    assert _submit(stubs["client-0"], "client-0", _update(rounds, 1.0)).received == 1
    _submit(stubs["client-1"], "client-1", _update(rounds, 3.0))
    _assert_all(_model(stubs["client-1"], "client-1", 1), 2.0)


def test_bad_input_fedavg_oversized_update_is_refused_by_the_transport(aggregator, tls_for):
    server, rounds, stubs = aggregator
    huge = [(n, np.zeros(s, np.float32)) for n, s in rounds.shapes.items()]
    huge.append(("padding", np.zeros(17 << 18, np.float32)))  # 17 MiB: over the 16 MiB message limit
    with lax_channel(f"localhost:{server.port}", tls_for("client-0")) as ch:
        code, details = refusal(_submit, pb_grpc.FedAvgAggregatorStub(ch), "client-0", huge)
    assert code == SC.RESOURCE_EXHAUSTED and "larger than max" in details, (code, details)
    with make_channel(f"localhost:{server.port}", tls=tls_for("client-0")) as ch:
        assert check_health(ch) == "SERVING"
    assert _submit(stubs["client-0"], "client-0", _update(rounds, 1.0)).received == 1  # not counted before


def test_fuzz_fedavg_aggregator_random_messages_and_raw_bytes(aggregator, tls_for):
    """Every method, random well-formed messages then random bytes: only refusals, then a correct round."""
    server, rounds, stubs = aggregator
    initial = {n: a.copy() for n, a in rounds.params}

    def still_correct(channel):
        # round 0's global model is still the initial one: nothing random was aggregated
        got = _model(pb_grpc.FedAvgAggregatorStub(channel), "client-0", 0)
        assert set(got) == set(initial)
        for name, array in initial.items():
            np.testing.assert_array_equal(got[name], array)

    names = list(rounds.shapes)
    with make_channel(f"localhost:{server.port}", tls=tls_for("client-0")) as ch:
        common = dict(timeouts={"GetModel": 0.05}, valid_after=still_correct)
        report = fuzz_service(
            ch, SERVICE, max_examples=40, strings=["client-0", "client-1"], shapes=list(rounds.shapes.values()),
            overrides={"securecollab.v1.NamedTensor.name": st.sampled_from(names)},
            extra_allowed={"GetModel": {SC.DEADLINE_EXCEEDED}}, **common)
        report.merge(fuzz_raw(ch, SERVICE, max_examples=30, **common))
    # the examples got past the identity checks into validation, and some were plain valid calls
    assert "INVALID_ARGUMENT" in report.codes("SubmitUpdate"), report.counts
    assert "OK" in report.codes("Join") and "PERMISSION_DENIED" in report.codes("Join"), report.counts
    # raw bytes that do not parse are refused by the transport with a clear message
    assert "not a valid securecollab.v1.JoinRequest" in report.details[("Join", "INVALID_ARGUMENT")]
    assert "INTERNAL" not in report.codes("Join") | report.codes("SubmitUpdate"), report.counts
    # An update needs all 6 tensors; the fuzzer sends at most 3 per message, so none was accepted, and a real
    # round still averages exactly what the two clients send.
    assert rounds.round == 0
    _submit(stubs["client-0"], "client-0", _update(rounds, 1.0), n=1)
    _submit(stubs["client-1"], "client-1", _update(rounds, 3.0), n=3)
    _assert_all(_model(stubs["client-0"], "client-0", 1), 2.5)
