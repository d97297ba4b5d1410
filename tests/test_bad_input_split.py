"""Bad input against the split-learning server: each refusal has its status and message, and training
goes on to exactly the result of a run that never saw the bad requests. Plus fuzzing of every method.

The server runs in process (as in test_split.py) over mutual TLS on loopback; the reference is a
second :class:`SplitServerState` fed only the good steps, in process. Split learning has no session
ids: "activations for an unknown session" are activations from a client the plan does not know
(NOT_FOUND) or for a turn that is not running (FAILED_PRECONDITION); both are below. Covered
already in test_split.py (not repeated): in U-shaped mode, labels sent, a Backward with no forward
pass, a wrong-shape gradient, an out-of-range epoch, a scalar Predict.
"""

from __future__ import annotations

import copy
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from hypothesis import strategies as st

from securecollab.generated.v1 import split_pb2 as pb
from securecollab.generated.v1 import split_pb2_grpc as pb_grpc
from securecollab.generated.v1 import tensor_pb2
from securecollab.models import parameters_to_arrays
from securecollab.net.certs import TlsFiles, make_certs
from securecollab.net.transport import make_channel, wait_budget
from securecollab.net.wire import decode_tensor, encode_named, encode_tensor
from securecollab.plans import SplitPlan
from securecollab.protocols.split import SplitServerState, optimizer_arrays, sgd
from services.split_server import MAX_PREDICT_ROWS, serve
from tests.service_fuzz import fuzz_raw, fuzz_service, lax_channel, messages, refusal, same_ca_certs

SC = grpc.StatusCode
SERVICE = pb.DESCRIPTOR.services_by_name["SplitServer"]


class Split:
    """An in-process split server and a stub per client certificate."""

    def __init__(self, tls_for, **plan):
        self.plan = SplitPlan(**{"num_clients": 2, "epochs": 2, **plan})
        self.server, self.state, _ = serve(self.plan, tls=tls_for("server"), host="127.0.0.1", block=False)
        self.target = f"localhost:{self.server.port}"
        self.channels = {c: make_channel(self.target, tls=tls_for(c)) for c in ("client-0", "client-1")}
        self.stubs = {c: pb_grpc.SplitServerStub(ch) for c, ch in self.channels.items()}

    def close(self):
        for ch in self.channels.values():
            ch.close()
        # Bounded: a server that cannot stop (a call left open) fails the test instead of hanging the suite.
        stopped = threading.Event()
        threading.Thread(target=lambda: (self.server.stop(grace=None), stopped.set()), daemon=True).start()
        assert stopped.wait(10), "the split server did not stop"


@pytest.fixture
def split(tls_for):
    made = []

    def make(**plan) -> Split:
        made.append(Split(tls_for, **plan))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _batch(seed: int, n: int = 4, cut=(64,)):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *cut)).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)


def _fwd(client="client-0", epoch=0, step=0, act=None, labels=None, **raw):
    req = pb.ForwardRequest(client_id=client, epoch=epoch, step=step)
    if act is not None:
        req.activations.CopyFrom(encode_tensor(act))
    if labels is not None:
        req.labels.CopyFrom(encode_tensor(labels))
    for name, msg in raw.items():
        getattr(req, name).CopyFrom(msg)
    return req


def _array(t) -> np.ndarray:
    return decode_tensor(t)


def _weights(part) -> dict[str, np.ndarray]:
    return dict(parameters_to_arrays(part))


def _assert_same_weights(state: SplitServerState, ref: SplitServerState):
    state.flush()
    ref.flush()
    got, expected = _weights(state.part), _weights(ref.part)
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6, err_msg=name)


def _overflowing(state: SplitServerState, rows: int) -> np.ndarray:
    """Finite activations whose first server-side unit overflows float32 (3e38 aligned with its weights)."""
    first = next(m for m in state.part if isinstance(m, torch.nn.Linear))
    return np.tile(3e38 * np.sign(first.weight.detach().numpy()[0]), (rows, 1)).astype(np.float32)


def test_bad_input_split_refused_batches_leave_training_identical_to_a_clean_run(split, tls_for):
    s = split(mode="vanilla")
    ref = SplitServerState(s.plan)
    c0 = s.stubs["client-0"]
    good = [_batch(k) for k in range(5)]
    got, expected = [], []

    def step(k, via_train=False):
        act, labels = good[k]
        if via_train:
            (reply,) = list(c0.Train(iter([_fwd(step=k, act=act, labels=labels)]), timeout=10))
        else:
            reply = c0.Forward(_fwd(step=k, act=act, labels=labels), timeout=10)
        got.append((_array(reply.gradient), reply.loss))
        grad, loss = ref.forward("client-0", 0, k, act, labels)
        expected.append((grad, loss))

    step(0)
    act, labels = good[1]
    cut = s.state.cut_shape
    bad = [
        # (request, status, message fragment)
        (_fwd(step=1, act=act.astype(np.float64), labels=labels), SC.INVALID_ARGUMENT, "expected dtype float32"),
        (_fwd(step=1, act=act.astype(np.float16), labels=labels), SC.INVALID_ARGUMENT, "expected dtype float32"),
        (_fwd(step=1, act=act[:, :-1], labels=labels), SC.INVALID_ARGUMENT, "activations must be shaped"),
        (_fwd(step=1, act=act[0], labels=labels[:1]), SC.INVALID_ARGUMENT, "activations must be shaped"),
        (_fwd(step=1, act=act[:0], labels=labels[:0]), SC.INVALID_ARGUMENT, "activations must be shaped (1..32"),
        (_fwd(step=1, act=np.zeros((33, *cut), np.float32), labels=np.zeros(33, np.int64)), SC.INVALID_ARGUMENT,
         "activations must be shaped (1..32"),
        (_fwd(step=1, act=np.where(np.arange(act.size).reshape(act.shape) == 7, np.inf, act).astype(np.float32),
              labels=labels), SC.INVALID_ARGUMENT, "NaN or Inf"),
        (_fwd(step=1, act=np.full_like(act, -np.inf), labels=labels), SC.INVALID_ARGUMENT, "NaN or Inf"),
        (_fwd(step=1, act=np.full_like(act, 3e38), labels=labels), SC.INVALID_ARGUMENT, "overflow"),
        (_fwd(step=1, act=act, labels=labels.astype(np.int32)), SC.INVALID_ARGUMENT, "expected dtype int64"),
        (_fwd(step=1, act=act, labels=labels.astype(np.float32)), SC.INVALID_ARGUMENT, "expected dtype int64"),
        (_fwd(step=1, act=act, labels=np.full(4, 10, np.int64)), SC.INVALID_ARGUMENT, "labels must lie in [0, 10)"),
        (_fwd(step=1, act=act, labels=np.full(4, -1, np.int64)), SC.INVALID_ARGUMENT, "labels must lie in [0, 10)"),
        (_fwd(step=1, act=act, labels=labels[:3]), SC.INVALID_ARGUMENT, "labels must be shaped (4,)"),
        (_fwd(step=1, act=act), SC.INVALID_ARGUMENT, "vanilla mode needs the labels"),
        (_fwd(step=1, labels=labels, activations=tensor_pb2.Tensor(
            dtype=tensor_pb2.DTYPE_FLOAT32, shape=[4, *cut], data=act.tobytes()[:-4])), SC.INVALID_ARGUMENT, "needs"),
        (_fwd(step=1, labels=labels, activations=tensor_pb2.Tensor(
            dtype=tensor_pb2.DTYPE_FLOAT32, shape=[8, *cut], data=act.tobytes())), SC.INVALID_ARGUMENT, "needs"),
        (_fwd(step=0, act=act, labels=labels), SC.ALREADY_EXISTS, "step 0 of epoch 0 was already taken"),
        (_fwd(epoch=1, step=5, act=act, labels=labels), SC.FAILED_PRECONDITION, "not training in epoch 1"),
        (_fwd(client="client-7", step=1, act=act, labels=labels), SC.NOT_FOUND, "unknown client 'client-7'"),
    ]
    for request, status, fragment in bad:
        code, details = refusal(c0.Forward, request, timeout=10)
        assert code == status and fragment in details, (fragment, code, details)
        # the same refusal on the streaming call, which then ends
        code, details = refusal(c0.Train, iter([request]), timeout=10)
        assert code == status and fragment in details, (fragment, code, details)
    # activations from a client whose turn it is not, and from another client's certificate
    code, details = refusal(s.stubs["client-1"].Forward, _fwd(client="client-1", step=1, act=act, labels=labels))
    assert code == SC.FAILED_PRECONDITION and "client-1 is not training in epoch 0" in details
    code, details = refusal(s.stubs["client-1"].Forward, _fwd(step=1, act=act, labels=labels))
    assert code == SC.PERMISSION_DENIED
    # more than the transport takes in one message (from a client that would send it)
    with lax_channel(s.target, tls_for("client-0")) as lax:
        big = np.zeros((32, 140_000), np.float32)  # ~17 MiB
        code, details = refusal(pb_grpc.SplitServerStub(lax).Forward, _fwd(step=1, act=big, labels=labels[:1]))
    assert code == SC.RESOURCE_EXHAUSTED and "larger than max" in details
    # evaluation with bad activations changes nothing either
    for x, fragment in [(np.zeros((2, *cut), np.float64), "expected dtype float32"),
                        (np.full((2, *cut), np.nan, np.float32), "NaN or Inf"),
                        (np.zeros((MAX_PREDICT_ROWS + 1, *cut), np.float32), f"at most {MAX_PREDICT_ROWS} rows"),
                        (np.zeros((2, 3), np.float32), "activations must be shaped"),
                        (_overflowing(s.state, 2), "overflow the server's layers")]:
        code, details = refusal(c0.Predict, pb.PredictRequest(client_id="client-0", activations=encode_tensor(x)))
        assert code == SC.INVALID_ARGUMENT and fragment in details, (fragment, details)

    step(1)
    step(2, via_train=True)
    # a stream whose second batch is refused: the first one still counts, the stream ends with the refusal
    act3, labels3 = good[3]
    replies = c0.Train(iter([_fwd(step=3, act=act3, labels=labels3), _fwd(step=4, act=np.full_like(act3, np.nan),
                                                                           labels=labels3)]), timeout=10)
    first = next(replies)
    with pytest.raises(grpc.RpcError) as e:
        next(replies)
    assert e.value.code() == SC.INVALID_ARGUMENT and "NaN or Inf" in e.value.details()
    got.append((_array(first.gradient), first.loss))
    expected.append(ref.forward("client-0", 0, 3, act3, labels3))
    step(4)
    for (g, loss), (eg, eloss) in zip(got, expected):
        np.testing.assert_allclose(g, eg, rtol=0, atol=1e-6)
        assert loss == pytest.approx(eloss, abs=1e-6)
    _assert_same_weights(s.state, ref)
    # and the server still evaluates with those weights
    x = good[0][0]
    reply = c0.Predict(pb.PredictRequest(client_id="client-0", activations=encode_tensor(x)), timeout=10)
    with torch.no_grad():
        np.testing.assert_allclose(_array(reply.outputs), ref.part.eval()(torch.from_numpy(x)).numpy(), atol=1e-6)


def test_bad_input_split_weight_gradients_that_overflow_change_no_weight(split):
    """Finite activations, outputs, loss and cut gradient whose *weight* gradients overflow float32: the
    unary Forward refuses the batch (step not used up); on the Train stream, where the cut's gradient goes
    back before the weights' gradients are computed, the server skips its step and refuses the client's next
    call once, saying so. Either way no server weight moves."""
    s = split(mode="vanilla")
    first, *_, last = [m for m in s.state.part if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        first.weight[:, 0] = 0  # the huge input unit reaches no output, and gets a zero cut gradient
        first.bias.fill_(0.5)   # every hidden unit active, so its gradient reaches the first layer
        last.weight.mul_(1e3)   # hidden gradients of order one: times 3e38, summed over the batch, overflow
    before = _weights(s.state.part)
    act, labels = _batch(0)
    act = np.zeros_like(act)
    act.reshape(len(act), -1)[:, 0] = 3e38
    c0 = s.stubs["client-0"]
    code, details = refusal(c0.Forward, _fwd(step=0, act=act, labels=labels), timeout=10)
    assert code == SC.INVALID_ARGUMENT and "non-finite" in details, details
    (reply,) = list(c0.Train(iter([_fwd(step=0, act=act, labels=labels)]), timeout=10))  # step 0 not used up
    assert np.isfinite(_array(reply.gradient)).all()
    s.state.flush()
    after = _weights(s.state.part)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    # the client hears of the skipped step on its next call (once), then trains as usual
    good, labels1 = _batch(1)
    code, details = refusal(c0.Forward, _fwd(step=1, act=good, labels=labels1), timeout=10)
    assert code == SC.FAILED_PRECONDITION and "step 0 of epoch 0" in details and "skipped" in details, details
    c0.Forward(_fwd(step=1, act=good, labels=labels1), timeout=10)
    assert any(not np.array_equal(_weights(s.state.part)[n], before[n]) for n in before)


def test_deferred_steps_are_taken_before_the_next_batch_reads_the_weights():
    """A step left pending (the Train stream's) is taken before the next batch's forward pass, even when nothing
    flushed it in between: the same weights, losses and gradients as stepping at once."""
    plan = SplitPlan(num_clients=1, epochs=1)
    deferred, at_once = SplitServerState(plan), SplitServerState(plan)
    for k in range(4):
        act, labels = _batch(k)
        got = deferred.forward("client-0", 0, k, act, labels, defer_step=True)
        expected = at_once.forward("client-0", 0, k, act, labels)
        np.testing.assert_array_equal(got[0], expected[0])
        assert got[1] == expected[1]
    deferred.flush()
    got, expected = _weights(deferred.part), _weights(at_once.part)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_bad_input_split_refused_gradient_keeps_the_forward_pass_waiting(split):
    """U-shaped: a refused Backward must leave its forward pass usable (it used to free the autograd
    graph, so the client's corrected gradient then failed with UNKNOWN)."""
    s = split(mode="ushaped")
    ref = SplitServerState(s.plan)
    c0 = s.stubs["client-0"]
    act, _ = _batch(1)
    reply = c0.Forward(_fwd(act=act), timeout=10)
    out = _array(reply.outputs)
    np.testing.assert_allclose(out, ref.forward("client-0", 0, 0, act, None)[0], atol=1e-6)
    grad = np.random.default_rng(2).standard_normal(out.shape).astype(np.float32)
    back = lambda g, step=0, epoch=0, **raw: c0.Backward(  # noqa: E731
        pb.BackwardRequest(client_id="client-0", epoch=epoch, step=step,
                           gradient=raw.get("tensor") or encode_tensor(g)), timeout=10)
    for g, kw, status, fragment in [
        (np.full_like(grad, 3e38), {}, SC.INVALID_ARGUMENT, "non-finite updates"),
        (np.full_like(grad, np.nan), {}, SC.INVALID_ARGUMENT, "NaN or Inf"),
        (grad.astype(np.float64), {}, SC.INVALID_ARGUMENT, "expected dtype float32"),
        (grad[:, :-1], {}, SC.INVALID_ARGUMENT, "gradient must be shaped"),
        (grad, {"step": 1}, SC.FAILED_PRECONDITION, "no forward pass of step 1, epoch 0"),
        (grad, {"epoch": 1}, SC.FAILED_PRECONDITION, "not training in epoch 1"),
        (grad, {"tensor": tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=list(grad.shape),
                                            data=grad.tobytes()[:-1])}, SC.INVALID_ARGUMENT, "needs"),
        (np.full_like(grad, 3e38), {}, SC.INVALID_ARGUMENT, "non-finite updates"),  # twice in a row
    ]:
        code, details = refusal(back, g, **kw)
        assert code == status and fragment in details, (fragment, code, details)
    result = _array(back(grad).gradient)
    np.testing.assert_allclose(result, ref.backward("client-0", 0, 0, grad), rtol=0, atol=1e-6)
    code, details = refusal(back, grad)  # the step is done: a replay has nothing to apply to
    assert code == SC.FAILED_PRECONDITION
    _assert_same_weights(s.state, ref)


def _client_side(plan: SplitPlan, seed: int):
    """Client-side weights and momentum as a client would hand them off (one SGD step from the seeded start)."""
    bottom, _, head = plan.parts(plan.build_model())
    mine = torch.nn.ModuleDict({"bottom": bottom, **({"head": head} if head is not None else {})})
    opt = sgd(mine, plan)
    torch.manual_seed(seed)
    x = torch.randn(4, *plan.load_data().input_shape)
    mine["bottom"](x).square().sum().backward()
    opt.step()
    return list(parameters_to_arrays(mine)), optimizer_arrays(mine, opt)


def test_bad_input_split_handoff_refuses_bad_weights_and_passes_on_the_good_ones(split):
    s = split(mode="vanilla")
    c0, c1 = s.stubs["client-0"], s.stubs["client-1"]
    assert c0.AwaitTurn(pb.TurnRequest(client_id="client-0", epoch=0), timeout=10).previous_client == ""
    weights, momentum = _client_side(s.plan, 0)
    named = lambda ws: encode_named(ws)  # noqa: E731
    end = lambda stub=c0, client="client-0", epoch=0, w=None, m=None: stub.EndTurn(  # noqa: E731
        pb.TurnEnd(client_id=client, epoch=epoch, client_weights=named(weights) if w is None else w,
                   client_optimizer=named(momentum) if m is None else m), timeout=10)
    as_dtype = lambda ws, dt: named([(n, a.astype(dt)) for n, a in ws])  # noqa: E731
    nan_weights = [(n, np.where(np.arange(a.size).reshape(a.shape) == 0, np.nan, a).astype(np.float32))
                   for n, a in weights]
    cases = [
        (dict(w=as_dtype(weights, np.float64)), SC.INVALID_ARGUMENT, "expected dtype float32, got float64"),
        (dict(w=as_dtype(weights, np.float16)), SC.INVALID_ARGUMENT, "expected dtype float32, got float16"),
        (dict(m=as_dtype(momentum, np.float64)), SC.INVALID_ARGUMENT, "expected dtype float32, got float64"),
        (dict(w=named(nan_weights)), SC.INVALID_ARGUMENT, "NaN or Inf"),
        (dict(w=named(weights[1:])), SC.INVALID_ARGUMENT, "missing tensors"),
        (dict(w=named([*weights, ("bottom.9.weight", weights[0][1])])), SC.INVALID_ARGUMENT, "unexpected tensor"),
        (dict(w=named([weights[1], weights[0]])[:1] + named(weights)), SC.INVALID_ARGUMENT, "duplicate tensor"),
        (dict(w=named([(weights[0][0], weights[0][1].reshape(-1)), *weights[1:]])), SC.INVALID_ARGUMENT,
         "expected shape"),
        (dict(m=named([("bottom.9.weight", momentum[0][1])])), SC.INVALID_ARGUMENT, "does not fit"),
        (dict(m=named([(momentum[0][0], momentum[0][1][:-1])])), SC.INVALID_ARGUMENT, "does not fit"),
        (dict(epoch=1), SC.FAILED_PRECONDITION, "it is not client-0's turn in epoch 1"),
        (dict(stub=c1, client="client-1"), SC.FAILED_PRECONDITION, "it is not client-1's turn in epoch 0"),
        (dict(stub=c1), SC.PERMISSION_DENIED, "cannot act as 'client-0'"),
        (dict(client="client-5"), SC.NOT_FOUND, "unknown client 'client-5'"),
    ]
    for kw, status, fragment in cases:
        code, details = refusal(end, **kw)
        assert code == status and fragment in details, (fragment, code, details)
    end()
    code, details = refusal(end)  # replayed: the turn is over
    assert code == SC.FAILED_PRECONDITION and "it is not client-0's turn" in details
    turn = c1.AwaitTurn(pb.TurnRequest(client_id="client-1", epoch=0), timeout=10)
    assert turn.previous_client == "client-0"
    for sent, received in ((weights, turn.client_weights), (momentum, turn.client_optimizer)):
        assert [m.name for m in received] == [n for n, _ in sent]
        for (_, a), m in zip(sent, received):
            np.testing.assert_array_equal(_array(m.tensor), a)
            assert _array(m.tensor).dtype == np.float32
    code, details = refusal(c0.AwaitTurn, pb.TurnRequest(client_id="client-0", epoch=0), timeout=10)
    assert code == SC.FAILED_PRECONDITION and "is over" in details


def test_bad_input_split_unknown_clients_and_foreign_certificates_change_nothing(split, tls_for, cert_dir, tmp_path):
    s = split(mode="vanilla")
    act, labels = _batch(0)
    weights, momentum = _client_side(s.plan, 0)
    calls = {
        "Join": lambda st_, cid: st_.Join(pb.SplitJoinRequest(client_id=cid), timeout=10),
        "AwaitTurn": lambda st_, cid: st_.AwaitTurn(pb.TurnRequest(client_id=cid, epoch=0), timeout=10),
        "EndTurn": lambda st_, cid: st_.EndTurn(pb.TurnEnd(client_id=cid, epoch=0, client_weights=encode_named(
            weights), client_optimizer=encode_named(momentum)), timeout=10),
        "Forward": lambda st_, cid: st_.Forward(_fwd(client=cid, act=act, labels=labels), timeout=10),
        "Backward": lambda st_, cid: st_.Backward(pb.BackwardRequest(client_id=cid, gradient=encode_tensor(act)),
                                                  timeout=10),
        "Train": lambda st_, cid: st_.Train(iter([_fwd(client=cid, act=act, labels=labels)]), timeout=10),
        "Predict": lambda st_, cid: st_.Predict(pb.PredictRequest(client_id=cid, activations=encode_tensor(act)),
                                                timeout=10),
        "Finish": lambda st_, cid: st_.Finish(pb.FinishRequest(client_id=cid), timeout=10),
    }
    party_dir = same_ca_certs(cert_dir, tmp_path / "certs", ["client-0:party"])
    with make_channel(s.target, tls=tls_for("server")) as party_ch, \
            make_channel(s.target, tls=TlsFiles.for_party(party_dir, "client-0")) as same_id_ch:
        foreign = {"client-1's certificate": (s.stubs["client-1"], "cannot act as 'client-0'"),
                   "a party certificate": (pb_grpc.SplitServerStub(party_ch), "cannot act as 'client-0'"),
                   "client-0's id with a party role": (pb_grpc.SplitServerStub(same_id_ch),
                                                       "a certificate of role 'party' cannot act as client 'client-0'")}
        for method, call in calls.items():
            for cid in ("client-7", "", "client-00", "server"):
                code, details = refusal(call, s.stubs["client-0"], cid)
                assert code == SC.NOT_FOUND and "unknown client" in details, (method, cid, code, details)
            for who, (stub, fragment) in foreign.items():
                code, details = refusal(call, stub, "client-0")
                assert code == SC.PERMISSION_DENIED and fragment in details, (method, who, code, details)
    # nothing of that reached the state: no step, no hand-off, no finish, still client-0's first turn
    assert s.state.finished == set() and s.state._last_step == {} and s.state._handoff is None
    assert s.state._current() == (0, "client-0")
    init = _weights(SplitServerState(s.plan).part)
    for name, value in _weights(s.state.part).items():
        np.testing.assert_array_equal(value, init[name])


def test_bad_input_split_await_turn_past_its_deadline_leaves_no_waiter(split):
    """An AwaitTurn whose deadline has passed when the handler asks must not wait (``time_remaining()``
    is 0 then, and ``0 or 600`` used to wait 600 s, holding a thread; the client's next AwaitTurn
    was refused as ALREADY_EXISTS for those 10 minutes). The race is timing-dependent, so many
    deadlines around the server's handling time are tried."""
    assert wait_budget(_Expired(), 600.0) == 0.0 and wait_budget(_Expired(None), 600.0) == 600.0
    s = split(mode="vanilla")
    c1 = s.stubs["client-1"]
    c1.Join(pb.SplitJoinRequest(client_id="client-1"), timeout=10)
    request = pb.TurnRequest(client_id="client-1", epoch=0)  # client-0's turn: client-1 would wait
    for i in range(60):
        with pytest.raises(grpc.RpcError):
            c1.AwaitTurn(request, timeout=0.0005 + i * 0.0001)
    time.sleep(0.3)
    settled = time.monotonic() + 5.0  # their handlers leave a moment after each deadline fires
    while s.state._waiting and time.monotonic() < settled:
        time.sleep(0.01)
    code, details = refusal(c1.AwaitTurn, request, timeout=0.5)
    assert code == SC.DEADLINE_EXCEEDED, details  # not ALREADY_EXISTS: no earlier call is still waiting
    # this last call's own handler leaves a moment after the client's deadline fires: give it a second
    deadline = time.monotonic() + 1.0
    while s.state._waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not s.state._waiting


def test_bad_input_split_unparsable_train_message_is_refused_and_the_server_still_stops(split):
    """A Train stream whose only message does not parse: gRPC alone answered INTERNAL but left the call
    open on the server, so ``Server.stop`` never returned (the split server could not finish its run).
    The transport now refuses it as INVALID_ARGUMENT from the handler's side."""
    s = split(mode="vanilla")
    channel = s.channels["client-0"]
    train = channel.stream_stream("/securecollab.v1.SplitServer/Train")  # bytes in, bytes out
    forward = channel.unary_unary("/securecollab.v1.SplitServer/Forward")
    for call, request in [(train, iter([b"\xff\xff"])), (train, iter([b"\xff", b"\xff"])),
                          (forward, b"\xff\xff")]:
        code, details = refusal(call, request, timeout=10)
        assert code == SC.INVALID_ARGUMENT and "not a valid securecollab.v1.ForwardRequest" in details, details
    act, labels = _batch(0)
    assert s.stubs["client-0"].Forward(_fwd(act=act, labels=labels), timeout=10).gradient.shape  # still training
    stopped = threading.Event()
    threading.Thread(target=lambda: (s.server.stop(grace=None), stopped.set()), daemon=True).start()
    assert stopped.wait(10), "the server did not stop"


class _Expired:
    """What `wait_budget` reads of a servicer context: the time left before the call's deadline."""

    def __init__(self, remaining: float | None = 0.0):
        self.remaining = remaining

    def time_remaining(self):
        return self.remaining


def test_split_server_serves_the_turn_holder_while_more_than_32_clients_wait(tmp_path):
    """Each waiting AwaitTurn holds a server thread; with make_server's default 32 threads, 39 waiting
    clients starved the client whose turn it was. The pool is sized to the clients + 16."""
    n = 40
    certs = tmp_path / "certs"
    ids = [f"client-{i}" for i in range(n)]
    make_certs(certs, ["split", *ids])
    plan = SplitPlan(num_clients=n, epochs=1)
    server, state, _ = serve(plan, tls=TlsFiles.for_party(certs, "split"), host="127.0.0.1", block=False)
    channels = {c: make_channel(f"localhost:{server.port}", tls=TlsFiles.for_party(certs, c)) for c in ids}
    try:
        stubs = {c: pb_grpc.SplitServerStub(ch) for c, ch in channels.items()}
        waits = {c: stubs[c].AwaitTurn.future(pb.TurnRequest(client_id=c, epoch=0), timeout=60) for c in ids[1:]}
        deadline = time.monotonic() + 10
        while len(state._waiting) < n - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(state._waiting) == n - 1  # every other client is waiting, each in a server thread
        c0 = stubs["client-0"]
        assert c0.AwaitTurn(pb.TurnRequest(client_id="client-0", epoch=0), timeout=5).previous_client == ""
        act, labels = _batch(0)
        assert c0.Forward(_fwd(act=act, labels=labels), timeout=5).gradient.shape
        weights, momentum = _client_side(plan, 0)
        end = pb.TurnEnd(epoch=0, client_weights=encode_named(weights), client_optimizer=encode_named(momentum))
        for i, c in enumerate(ids):  # every waiting client gets its turn in order
            if i:
                assert waits[c].result(timeout=10).previous_client == ids[i - 1]
            end.client_id = c
            stubs[c].EndTurn(end, timeout=5)
    finally:
        for ch in channels.values():
            ch.close()
        server.stop(grace=None)


def _forward_requests(cut, labels: bool, shapes):
    """ForwardRequests: half of them a valid batch from client-0 (so steps really run), half anything."""
    def valid(rows: int, epoch: int, step: int):
        act, y = _batch(rows, n=rows, cut=cut)
        return _fwd(epoch=epoch, step=step, act=act, labels=y if labels else None)

    return st.one_of(st.builds(valid, st.integers(1, 5), st.integers(0, 1), st.integers(0, 2**32 - 1)),
                     messages(pb.ForwardRequest.DESCRIPTOR, strings=["client-0"], shapes=shapes))


@pytest.mark.parametrize("mode,client_weights", [("vanilla", "handoff"), ("ushaped", "per_client")])
def test_fuzz_split_server_random_messages_and_raw_bytes(split, mode, client_weights):
    """Every method, random well-formed messages then random bytes, as client-0: only refusals or real
    steps; afterwards client-1 (whom the fuzzer cannot impersonate) still trains correctly, or the
    server still evaluates with exactly its current weights."""
    s = split(mode=mode, client_weights=client_weights)
    cut = s.state.cut_shape
    names = list(s.state.client_shapes)
    steps = iter(range(10**6))
    x = _batch(9, cut=cut)[0]

    def still_correct(channel):
        if mode == "vanilla":  # client-1 cannot train before client-0's turn ends; evaluation must be exact
            reply = s.stubs["client-0"].Predict(pb.PredictRequest(client_id="client-0", activations=encode_tensor(x)),
                                                timeout=10)
            with s.state._lock:
                part = copy.deepcopy(s.state.part).eval()
            with torch.no_grad():
                np.testing.assert_allclose(_array(reply.outputs), part(torch.from_numpy(x)).numpy(), atol=1e-6)
            return
        # U-shaped, one client-side model per client: client-1 takes a real step, checked against a copy
        k = next(steps)
        act = _batch(100 + k, cut=cut)[0]
        with s.state._lock:
            s.state._flush()
            part = copy.deepcopy(s.state.part)
        c1 = s.stubs["client-1"]
        out = _array(c1.Forward(_fwd(client="client-1", step=k, act=act), timeout=10).outputs)
        a = torch.from_numpy(act).requires_grad_(True)
        expected = part.train()(a)
        np.testing.assert_allclose(out, expected.detach().numpy(), atol=1e-6)
        grad = np.ones_like(out)
        back = c1.Backward(pb.BackwardRequest(client_id="client-1", step=k, gradient=encode_tensor(grad)), timeout=10)
        expected.backward(torch.from_numpy(grad))
        np.testing.assert_allclose(_array(back.gradient), a.grad.numpy(), atol=1e-6)

    common = dict(timeouts={"AwaitTurn": 0.05}, valid_after=still_correct)
    shapes = [(4, *cut), (1, *cut), (4,), *s.state.client_shapes.values()]
    report = fuzz_service(
        s.channels["client-0"], SERVICE, max_examples=30, strings=["client-0", "client-1"], shapes=shapes,
        overrides={"securecollab.v1.NamedTensor.name": st.sampled_from(names),
                   "securecollab.v1.ForwardRequest": _forward_requests(cut, mode == "vanilla", shapes)},
        extra_allowed={"AwaitTurn": {SC.DEADLINE_EXCEEDED}}, **common)
    report.merge(fuzz_raw(s.channels["client-0"], SERVICE, max_examples=25, **common))
    # the examples reached the protocol's checks, and some were real training steps
    assert "OK" in report.codes("Forward") and "INVALID_ARGUMENT" in report.codes("Forward"), report.counts
    assert {"INVALID_ARGUMENT", "PERMISSION_DENIED"} <= report.codes("EndTurn"), report.counts
    assert "not a valid securecollab.v1.SplitJoinRequest" in report.details[("Join", "INVALID_ARGUMENT")]
    assert not any("INTERNAL" in report.codes(m.name) for m in SERVICE.methods), report.counts
