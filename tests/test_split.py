"""Split learning over gRPC: equivalent to centralized training, labels kept home in U-shaped mode, defences."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from securecollab.generated.v1 import split_pb2 as pb
from securecollab.generated.v1 import split_pb2_grpc as pb_grpc
from securecollab.models import load_arrays
from securecollab.net.transport import make_channel
from securecollab.net.wire import encode_tensor
from securecollab.plans import FedAvgPlan, SplitPlan, split_plan_of
from securecollab.protocols.split import distance_correlation, sgd
from securecollab.runs import run_protocol
from securecollab.training import batch_order
from securecollab.transcript import load_transcript
from services.split_server import serve


def centralized_in_turn_order(plan: SplitPlan) -> dict[str, np.ndarray]:
    """The same model, one optimizer, the clients' batches in the order the turns take them."""
    ds = plan.load_data()
    model = plan.build_model(ds)
    opt = sgd(model, plan)
    shards = [plan.shard(k, ds) for k in range(plan.num_clients)]
    model.train()
    for epoch in range(plan.epochs):
        for x, y in shards:
            for idx in batch_order(len(x), plan.batch_size, plan.seed, epoch):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx])).backward()
                opt.step()
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def split_parameters(plan: SplitPlan, out) -> dict[str, np.ndarray]:
    """The full model as split training left it: the last client's part and the server's part."""
    model = plan.build_model()
    bottom, part, head = plan.parts(model)
    with np.load(out / "split_server_part.npz", allow_pickle=False) as f:
        load_arrays(part, [(k, f[k]) for k in f.files])
    mine = torch.nn.ModuleDict({"bottom": bottom, **({"head": head} if head is not None else {})})
    with np.load(out / f"split_{plan.client_ids()[-1]}_part.npz", allow_pickle=False) as f:
        load_arrays(mine, [(k, f[k]) for k in f.files])
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["vanilla", "ushaped"])
def test_one_epoch_of_split_training_equals_centralized(mode, tmp_path):
    plan = SplitPlan(num_clients=2, epochs=1, mode=mode)
    out = tmp_path / "run"
    run_protocol("split", FedAvgPlan(), out, split=plan)
    expected = centralized_in_turn_order(plan)
    got = split_parameters(plan, out)
    assert set(got) == set(expected)
    worst = max(float(np.abs(got[k] - expected[k]).max()) for k in expected)
    assert worst <= 1e-5
    # and training did move the weights: the comparison is not trivially between two initialisations
    init = {k: v.detach().numpy() for k, v in plan.build_model().state_dict().items()}
    assert max(float(np.abs(got[k] - init[k]).max()) for k in init) > 1e-2

    server = load_transcript(out / "transcripts" / "split-server.jsonl")
    batches = server.of_kind("batch")
    assert len(batches) == sum(len(batch_order(len(plan.shard(k)[0]), 32, 0, 0)) for k in range(2))
    if mode == "vanilla":  # positive control: labels do reach the server in vanilla mode
        y0 = plan.shard(0)[1]
        first = batch_order(len(y0), 32, 0, 0)[0]
        np.testing.assert_array_equal(batches[0].tensors["labels"], y0[first])
    else:  # U-shaped: no label, and nothing label-typed, reaches the server
        assert all("labels" not in r.tensors for r in server.records)
        assert all(a.dtype == np.float32 for r in server.records for a in r.tensors.values())
        assert all(r.tensors["outputs_returned"].shape[1] != 10 for r in batches)  # not logits either


@pytest.mark.slow
def test_split_accuracy_is_within_a_point_of_centralized(tmp_path):
    plan = FedAvgPlan(num_clients=4)
    central = run_protocol("centralized", plan, tmp_path / "c")["accuracy"]
    split = run_protocol("split", plan, tmp_path / "s", split=split_plan_of(plan, record_transcripts=False))
    assert split["accuracy"] >= central - 0.01, (split["accuracy"], central)
    # bytes: activations and gradients of every training batch (+ labels), the test-set predictions of
    # the 4 clients, and the client-side weights with their momentum at every hand-off (4160 floats each)
    ds = SplitPlan().load_data()
    epochs, n, turns = 30, len(ds.x_train), 30 * 4
    exchanged = (epochs * n * (64 * 4 * 2 + 8) + len(ds.x_test) * (64 + 10) * 4 * 4
                 + (2 * turns - 1) * 2 * 4160 * 4)
    measured = split["costs"]["bytes_sent"] + split["costs"]["bytes_received"]
    assert exchanged <= measured <= 1.05 * exchanged


def test_distance_correlation_sees_dependence_and_independence():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    assert distance_correlation(x, 3 * x + 1) == pytest.approx(1.0, abs=1e-4)
    independent = float(distance_correlation(x, torch.randn(256, 8, generator=g)))
    assert independent < 0.4  # the sample statistic is biased upwards at n=256, d=8
    assert float(distance_correlation(x, x ** 2)) > independent + 0.1  # dependence without correlation
    z = x.clone().requires_grad_(True)
    distance_correlation(x, z).backward()
    assert torch.isfinite(z.grad).all()


@pytest.fixture
def split_server(tls_for):
    plan = SplitPlan(num_clients=2, epochs=1, mode="ushaped")
    server, state, _ = serve(plan, tls=tls_for("server"), host="127.0.0.1", block=False)
    yield server, state
    server.stop(grace=None)


def test_bad_requests_are_refused_and_the_server_keeps_training(split_server, tls_for):
    server, state = split_server
    act = np.zeros((4, *state.cut_shape), np.float32)
    with make_channel(f"localhost:{server.port}", tls=tls_for("client-0")) as ch:
        stub = pb_grpc.SplitServerStub(ch)

        def status(call, request):
            with pytest.raises(grpc.RpcError) as e:
                call(request, timeout=10)
            return e.value.code()

        fwd = lambda **kw: pb.ForwardRequest(**{"client_id": "client-0", "epoch": 0, "step": 0,
                                                "activations": encode_tensor(act), **kw})
        assert status(stub.Forward, fwd(client_id="client-1")) == grpc.StatusCode.PERMISSION_DENIED
        assert status(stub.Forward, fwd(client_id="client-7")) == grpc.StatusCode.NOT_FOUND
        assert status(stub.Forward, fwd(activations=encode_tensor(np.zeros((4, 3), np.float32)))) \
            == grpc.StatusCode.INVALID_ARGUMENT
        assert status(stub.Forward, fwd(activations=encode_tensor(np.full_like(act, np.nan)))) \
            == grpc.StatusCode.INVALID_ARGUMENT
        assert status(stub.Forward, fwd(labels=encode_tensor(np.zeros(4, np.int64)))) \
            == grpc.StatusCode.INVALID_ARGUMENT  # U-shaped: labels stay home
        assert status(stub.Backward, pb.BackwardRequest(client_id="client-0", epoch=0, step=0,
                                                        gradient=encode_tensor(act))) \
            == grpc.StatusCode.FAILED_PRECONDITION  # no forward pass awaits it
        # client-1 trains only after client-0's turn
        with make_channel(f"localhost:{server.port}", tls=tls_for("client-1")) as ch1:
            other = pb_grpc.SplitServerStub(ch1)
            assert status(other.Forward, fwd(client_id="client-1")) == grpc.StatusCode.FAILED_PRECONDITION
        assert status(stub.AwaitTurn, pb.TurnRequest(client_id="client-0", epoch=5)) == grpc.StatusCode.OUT_OF_RANGE
        turn = stub.AwaitTurn(pb.TurnRequest(client_id="client-0", epoch=0), timeout=10)
        assert turn.previous_client == ""
        assert status(stub.Predict, pb.PredictRequest(client_id="client-0", activations=encode_tensor(
            np.array(1.0, np.float32)))) == grpc.StatusCode.INVALID_ARGUMENT
        # finite but overflowing activations are refused, and the step is not used up
        assert status(stub.Forward, fwd(activations=encode_tensor(np.full_like(act, 3e38)))) \
            == grpc.StatusCode.INVALID_ARGUMENT
        reply = stub.Forward(fwd(), timeout=10)
        out = np.frombuffer(reply.outputs.data, np.float32).reshape(tuple(reply.outputs.shape))
        assert status(stub.Forward, fwd()) == grpc.StatusCode.ALREADY_EXISTS  # replayed step
        wrong = encode_tensor(np.zeros((4, 1), np.float32))
        assert status(stub.Backward, pb.BackwardRequest(client_id="client-0", epoch=0, step=0, gradient=wrong)) \
            == grpc.StatusCode.INVALID_ARGUMENT
        back = stub.Backward(pb.BackwardRequest(client_id="client-0", epoch=0, step=0,
                                                gradient=encode_tensor(np.ones_like(out))), timeout=10)
        assert tuple(back.gradient.shape) == act.shape


@pytest.mark.slow
def test_defences_change_what_the_server_sees(tmp_path):
    """Noise: the server's activations are the bottom's outputs plus N(0, sigma^2). NoPeek: they depend less on the input."""
    def run(name, **defence):
        plan = SplitPlan(num_clients=1, epochs=3, **defence)
        run_protocol("split", FedAvgPlan(), tmp_path / name, split=plan)
        return plan, load_transcript(tmp_path / name / "transcripts" / "split-server.jsonl").of_kind("batch")

    plan, clean = run("clean")
    _, noisy = run("noise", noise_sigma=1.0)
    _, nopeek = run("nopeek", nopeek_alpha=2.0)
    x, _ = plan.shard(0)
    # The very first batch is computed with the seeded initial weights in every run.
    first = x[batch_order(len(x), 32, 0, 0)[0]]
    bottom, _, _ = plan.parts(plan.build_model())
    with torch.no_grad():
        exact = bottom(torch.from_numpy(first)).numpy()
    np.testing.assert_allclose(clean[0].tensors["activations"], exact, atol=1e-6)  # control: nothing added
    assert 0.9 < float(np.std(noisy[0].tensors["activations"] - exact)) < 1.1
    # In the last epoch NoPeek's activations are less dependent on the inputs (distance correlation).
    idx = batch_order(len(x), 32, 0, 2)
    inputs = torch.from_numpy(np.concatenate([x[i] for i in idx]).reshape(len(x), -1))
    def dcor(batches):
        act = np.concatenate([b.tensors["activations"] for b in batches if b.round == 2])
        return float(distance_correlation(inputs, torch.from_numpy(act)))
    assert dcor(nopeek) < dcor(clean) - 0.05
