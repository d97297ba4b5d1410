"""Plain FedAvg over gRPC: the baseline must be correct, measured and recorded honestly."""

import json

import grpc
import numpy as np
import pytest

from securecollab.errors import ProtocolError
from securecollab.generated.v1 import fedavg_pb2 as pb
from securecollab.generated.v1 import fedavg_pb2_grpc as pb_grpc
from securecollab.models import count_parameters
from securecollab.net.transport import make_channel
from securecollab.net.wire import encode_named
from securecollab.plans import FedAvgPlan, client_data
from securecollab.protocols.fedavg import FedAvgRounds, local_update
from securecollab.runs import run_protocol
from securecollab.training import one_thread
from securecollab.transcript import load_transcript
from services.fedavg_aggregator import serve


def _params(value: float):
    return [("w", np.full((2, 2), value, np.float32)), ("b", np.full(2, value, np.float32))]


def test_rounds_average_weighted_by_examples():
    plan = FedAvgPlan(num_clients=2, rounds=2)
    r = FedAvgRounds(plan, _params(0.0))
    r.submit("client-0", 0, 1, _params(1.0))
    assert r.round == 0  # waits for every client
    r.submit("client-1", 0, 3, _params(5.0))
    assert r.round == 1
    np.testing.assert_allclose(dict(r.params)["w"], 4.0)  # (1*1 + 3*5) / 4


@pytest.mark.parametrize("client, round_, n, code", [
    ("client-9", 0, 1, "NOT_FOUND"),
    ("client-0", 1, 1, "FAILED_PRECONDITION"),
    ("client-0", 0, 0, "INVALID_ARGUMENT"),
])
def test_rounds_refuse_bad_submissions(client, round_, n, code):
    r = FedAvgRounds(FedAvgPlan(num_clients=2, rounds=1), _params(0.0))
    with pytest.raises(ProtocolError) as e:
        r.submit(client, round_, n, _params(1.0))
    assert e.value.code == code


def test_rounds_refuse_duplicate_and_keep_first():
    r = FedAvgRounds(FedAvgPlan(num_clients=2, rounds=1), _params(0.0))
    r.submit("client-0", 0, 1, _params(1.0))
    with pytest.raises(ProtocolError) as e:
        r.submit("client-0", 0, 1, _params(100.0))
    assert e.value.code == "ALREADY_EXISTS"
    r.submit("client-1", 0, 1, _params(3.0))
    np.testing.assert_allclose(dict(r.params)["b"], 2.0)


@pytest.fixture
def aggregator(tls_for, tmp_path):
    plan = FedAvgPlan(num_clients=2, rounds=1)
    server, rounds, _ = serve(plan, tls=tls_for("aggregator"), host="127.0.0.1", block=False)
    yield server, rounds
    server.stop(grace=None)


def _stub(tls, port):
    channel = make_channel(f"localhost:{port}", tls=tls)
    return channel, pb_grpc.FedAvgAggregatorStub(channel)


def test_aggregator_refuses_bad_input_and_keeps_serving(aggregator, tls_for):
    server, rounds = aggregator
    ch, stub = _stub(tls_for("client-0"), server.port)
    good = [(n, np.zeros(s, np.float32)) for n, s in rounds.shapes.items()]
    nan = [(n, np.full(s, np.nan, np.float32)) for n, s in rounds.shapes.items()]
    wrong_shape = [(n, np.zeros((3,), np.float32)) for n in rounds.shapes]
    for params, client, code in [
        (nan, "client-0", grpc.StatusCode.INVALID_ARGUMENT),
        (wrong_shape, "client-0", grpc.StatusCode.INVALID_ARGUMENT),
        (good, "client-1", grpc.StatusCode.PERMISSION_DENIED),  # client-0's cert acting as client-1
        (good, "client-7", grpc.StatusCode.NOT_FOUND),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            stub.SubmitUpdate(pb.ClientUpdate(client_id=client, round=0, num_examples=1,
                                              params=encode_named(params)), timeout=10)
        assert e.value.code() == code, e.value.details()
    ack = stub.SubmitUpdate(pb.ClientUpdate(client_id="client-0", round=0, num_examples=1,
                                            params=encode_named(good)), timeout=10)
    assert ack.received == 1
    with pytest.raises(grpc.RpcError) as e:
        stub.SubmitUpdate(pb.ClientUpdate(client_id="client-0", round=0, num_examples=1,
                                          params=encode_named(good)), timeout=10)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    ch.close()


def test_aggregator_refuses_client_of_another_ca(aggregator, cert_dir, other_ca_dir):
    from securecollab.net.certs import TlsFiles
    server, _ = aggregator
    _, cert, key = TlsFiles.for_party(other_ca_dir, "client-0").read()
    # The client trusts our CA, so only its own certificate is at fault.
    creds = grpc.ssl_channel_credentials(root_certificates=(cert_dir / "ca.pem").read_bytes(),
                                         private_key=key, certificate_chain=cert)
    with grpc.secure_channel(f"localhost:{server.port}", creds) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.FedAvgAggregatorStub(ch).Join(pb.JoinRequest(client_id="client-0"), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory):
    """One real run: aggregator + 4 client processes over mutual TLS on loopback, and the centralized baseline."""
    out = tmp_path_factory.mktemp("fedavg")
    plan = FedAvgPlan(num_clients=4)
    return plan, out, run_protocol("fedavg", plan, out / "fedavg"), run_protocol("centralized", plan, out / "central")


@pytest.mark.slow
def test_fedavg_matches_centralized_accuracy_within_2pp(fedavg_run):
    _, _, fed, central = fedavg_run
    assert central["accuracy"] > 0.9
    assert abs(fed["accuracy"] - central["accuracy"]) <= 0.02, (fed["accuracy"], central["accuracy"])


@pytest.mark.slow
def test_cost_meter_counts_the_updates_a_client_sent(fedavg_run):
    plan, out, fed, _ = fedavg_run
    n_params = count_parameters(plan.build_model())
    expected = n_params * 4 * plan.rounds
    for cid in plan.client_ids():
        sent = json.loads((out / "fedavg" / f"result_{cid}.json").read_text())["costs"]["bytes_sent"]
        assert expected <= sent <= expected * 1.05, (cid, sent, expected)
        # and it received one global model per round plus the final one
        received = fed["costs"]["parties"][cid]["bytes_received"]
        assert n_params * 4 * (plan.rounds + 1) <= received <= n_params * 4 * (plan.rounds + 1) * 1.05


@pytest.mark.slow
def test_aggregator_transcript_holds_each_update_as_sent(fedavg_run):
    """Replay each client's deterministic local training from the global model it received:
    the aggregator's transcript must hold exactly that update, for every client and round."""
    plan, out, _, _ = fedavg_run
    agg = load_transcript(out / "fedavg" / "transcripts" / "aggregator.jsonl")
    updates = {(r.sender, r.round): r for r in agg.of_kind("update")}
    assert len(updates) == plan.num_clients * plan.rounds
    for i, cid in enumerate(plan.client_ids()):
        ds, x, y = client_data(plan, i)
        model = plan.build_model(ds)
        received = load_transcript(out / "fedavg" / "transcripts" / f"{cid}.jsonl")
        for rec in received.of_kind("global_model"):
            if rec.meta["done"]:
                continue
            with one_thread():  # as the client processes run (OMP_NUM_THREADS=1): same summation order
                sent = local_update(model, plan, rec.round, list(rec.tensors.items()), x, y, i)
            got = updates[(cid, rec.round)]
            assert got.meta["num_examples"] == len(x)
            for name, value in sent:
                np.testing.assert_array_equal(got.tensors[name], value)
