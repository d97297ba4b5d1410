"""The compute parties' MPC transport (mutual TLS, no pickle): who may talk, and what a bad peer gets.

In-process: real gRPC servers on loopback with the project's certificates; the MPC itself runs
across processes in tests/test_mpc.py and tests/test_mpc_wire.py.
"""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import torch

from securecollab.generated.v1 import mpc_pb2 as pb
from securecollab.generated.v1 import mpc_pb2_grpc as pb_grpc
from securecollab.net.certs import TlsFiles, make_certs
from securecollab.net.transport import make_channel, make_server
from securecollab.secagg.mpc_net import MpcError, form_world, object_frames, read_message, start_endpoint, tensor_frames
from securecollab.secagg.mpc_objects import ObjectError, decode_object, encode_object
from services.secagg_dealer import SERVICE as DEALER_SERVICE
from services.secagg_dealer import DealerServicer

WORLD = bytes(32)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("mpc-certs")
    make_certs(d, ["party-0", "party-1", "party-2", "dealer", "client-0", "coordinator"])
    other = tmp_path_factory.mktemp("mpc-other-ca")
    make_certs(other, ["party-1"])
    return d, other


def tls(d, who):
    return TlsFiles.for_party(d, who)


@pytest.fixture
def endpoint(certs):
    """party-0's MPC endpoint in a 3-party world whose id is WORLD (as if formed)."""
    d, _ = certs
    server, servicer = start_endpoint(0, 3, True, tls(d, "party-0"), port=0, host="127.0.0.1")
    servicer.inbox.open(WORLD)
    yield server, servicer
    server.stop(grace=None)


def stub_as(d, who, port, service=pb_grpc.MpcPeerStub, name="party-0"):
    return service(make_channel(f"localhost:{port}", tls=tls(d, who), server_name=name))


def test_objects_round_trip_exactly_and_anything_else_is_refused():
    for value in (None, True, 3, -2**70, 1.5, "x", torch.Size([2, 3]), (1, [2, "a"]), {"k": (torch.Size([]),)}):
        back = decode_object(encode_object(value))
        assert back == value and type(back) is type(value)
    for bad in (object(), {1: 2}, float("nan"), np.int64(3), b"bytes", torch.zeros(2)):
        with pytest.raises(ObjectError):
            encode_object(bad)
    # a pickle is not JSON; an unknown kind or a wrong payload type is refused
    import pickle
    for data in (pickle.dumps({"a": 1}), b'{"class": "os.system"}', b'{"int": 3}', b'{"size": [-1]}', b"[" * 100):
        with pytest.raises(ObjectError):
            decode_object(data)


def test_tensors_survive_framing_and_malformed_frames_are_refused():
    x = torch.randint(-2**62, 2**62, (3, 700_000), dtype=torch.long)  # 16.8 MB: 17 frames
    frames = list(tensor_frames(WORLD, 4, x))
    assert len(frames) == 17 and all(len(f.data) <= 1 << 20 for f in frames)
    world, seq, back = read_message(frames)
    assert world == WORLD and seq == 4 and torch.equal(back, x)
    _, _, obj = read_message(object_frames(WORLD, 0, torch.Size([5])))
    assert obj == torch.Size([5])
    from securecollab.net.wire import WireError
    for broken in (frames[:-1], frames + [frames[-1]], [frames[0], frames[2]] + frames[3:], []):
        with pytest.raises(WireError):
            read_message(broken)


def test_only_peers_of_the_world_may_talk_to_a_party(endpoint, certs):
    d, other = certs
    server, servicer = endpoint
    hello = pb.MpcHello(world_size=3, nonce=bytes(32), dealer=True)
    assert stub_as(d, "party-1", server.port).Hello(hello, timeout=5).nonce == servicer.nonce
    for who in ("client-0", "coordinator", "dealer", "party-0"):  # not a peer: clients, others, itself
        with pytest.raises(grpc.RpcError) as e:
            stub_as(d, who, server.port).Hello(hello, timeout=5)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, who
        with pytest.raises(grpc.RpcError) as e:
            stub_as(d, who, server.port).Deliver(iter(tensor_frames(WORLD, 0, torch.zeros(2, dtype=torch.long))),
                                                 timeout=5)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, who
    # a certificate of another CA does not get through the TLS handshake at all
    with pytest.raises(grpc.RpcError) as e:
        stub_as(other, "party-1", server.port).Hello(hello, timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # a misconfigured peer (another world size) is told so
    with pytest.raises(grpc.RpcError) as e:
        stub_as(d, "party-1", server.port).Hello(pb.MpcHello(world_size=2, nonce=bytes(32), dealer=True), timeout=5)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert servicer.inbox.broken is None  # refusals do not break the world
    assert not any(servicer.inbox.pending.values())


def deliver(d, port, frames, who="party-1"):
    return stub_as(d, who, port).Deliver(iter(frames), timeout=5)


def test_messages_are_taken_in_order_with_the_due_shape(endpoint, certs):
    d, _ = certs
    server, servicer = endpoint
    for seq in range(3):
        deliver(d, server.port, tensor_frames(WORLD, seq, torch.full((4,), seq, dtype=torch.long)))
    like = torch.empty(4, dtype=torch.long)
    assert [servicer.inbox.take(1, 5, like=like)[0].item() for _ in range(3)] == [0, 1, 2]


@pytest.mark.parametrize("fault", ["replay", "out_of_order", "garbage", "other_world", "wrong_shape", "silence"])
def test_a_bad_or_silent_peer_breaks_the_world_with_its_name(endpoint, certs, fault):
    d, _ = certs
    server, servicer = endpoint
    inbox, like = servicer.inbox, torch.empty(4, dtype=torch.long)
    ok = torch.arange(4, dtype=torch.long)
    expect_refused = {"replay": grpc.StatusCode.INVALID_ARGUMENT, "out_of_order": grpc.StatusCode.INVALID_ARGUMENT,
                      "garbage": grpc.StatusCode.INVALID_ARGUMENT, "other_world": grpc.StatusCode.FAILED_PRECONDITION}
    if fault == "replay":  # message 0 again, but not the same (the same one again: the next test)
        deliver(d, server.port, tensor_frames(WORLD, 0, ok))
        frames = tensor_frames(WORLD, 0, ok + 1)
    elif fault == "out_of_order":
        frames = tensor_frames(WORLD, 5, ok)
    elif fault == "garbage":
        first = next(tensor_frames(WORLD, 0, ok))
        first.tensor.data = b"\x00" * 7  # 7 bytes for 4 int64
        frames = [first]
    elif fault == "other_world":
        frames = tensor_frames(b"\x01" * 32, 0, ok)
    elif fault == "wrong_shape":
        frames = tensor_frames(WORLD, 0, torch.arange(5, dtype=torch.long))
    if fault in expect_refused:
        with pytest.raises(grpc.RpcError) as e:
            deliver(d, server.port, frames)
        assert e.value.code() == expect_refused[fault]
    elif fault == "wrong_shape":
        deliver(d, server.port, frames)
    if fault == "replay":
        inbox.take(1, 5, like=like)  # the original was fine
    with pytest.raises(MpcError, match="party-1"):
        inbox.take(1, 0.5 if fault == "silence" else 5, like=like)
    # once broken, every later step fails at once, naming the first fault
    with pytest.raises(MpcError, match="party-1"):
        inbox.take(2, 60, like=like)


@pytest.mark.parametrize("message", [torch.arange(4, dtype=torch.long), [torch.Size([4]), "ok"]],
                         ids=["tensor", "object"])
def test_the_last_message_sent_again_counts_once_and_an_older_one_breaks_the_world(endpoint, certs, message):
    """gRPC retries a delivery on UNAVAILABLE: when only its answer was lost, the same message comes again."""
    d, _ = certs
    server, servicer = endpoint
    inbox = servicer.inbox
    frames = tensor_frames if isinstance(message, torch.Tensor) else object_frames
    take = (lambda: inbox.take(1, 5, like=message)) if isinstance(message, torch.Tensor) else \
        (lambda: inbox.take(1, 5, is_object=True))
    deliver(d, server.port, frames(WORLD, 0, message))
    deliver(d, server.port, frames(WORLD, 0, message))  # acknowledged again
    assert inbox.broken is None and inbox.arrived[1] == 1 and list(inbox.pending[1]) == [0]
    got = take()
    assert torch.equal(got, message) if isinstance(message, torch.Tensor) else got == message
    deliver(d, server.port, frames(WORLD, 0, message))  # after it was taken, too
    deliver(d, server.port, object_frames(WORLD, 1, "next"))
    assert inbox.broken is None and inbox.take(1, 5, is_object=True) == "next"
    with pytest.raises(grpc.RpcError) as e:  # message 0 once 1 has come is a replay
        deliver(d, server.port, frames(WORLD, 0, message))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(MpcError, match="party-1 sent message 0 .replayed"):
        take()


def test_world_forms_over_tls_and_refuses_an_intruder_posing_as_a_party(certs):
    d, other = certs
    ends = [start_endpoint(r, 2, False, tls(d, f"party-{r}"), port=0, host="127.0.0.1") for r in range(2)]
    targets = [f"localhost:{s.port}" for s, _ in ends]
    worlds = [None, None]

    def form(r):
        worlds[r] = form_world(ends[r][1], targets, tls(d, f"party-{r}"), form_timeout_s=20)

    threads = [threading.Thread(target=form, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert worlds[0].world_id == worlds[1].world_id
    # the world id hashes both fresh nonces: a party restarted later cannot be mixed into it
    assert ends[0][1].nonce != ends[1][1].nonce
    intruder, _ = start_endpoint(1, 2, False, tls(other, "party-1"), port=0, host="127.0.0.1")
    try:
        # an endpoint with another CA's certificate never completes a handshake: no world with it forms
        with pytest.raises(MpcError, match="did not answer"):
            form_world(ends[0][1], [targets[0], f"localhost:{intruder.port}"], tls(d, "party-0"), form_timeout_s=3)
    finally:
        intruder.stop(grace=None)
        for w in worlds:
            w.close()
        for s, _ in ends:
            s.stop(grace=None)


def test_parties_agree_on_the_world_when_a_peer_restarts_while_it_forms(certs):
    """party 1 answers party 0's Hello, then restarts (a new process: a new nonce) before the world is up.
    Without agreement party 0 would hash the dead process's nonce and break the others' world with its
    first message, and every restart could repeat the race (a livelock seen here)."""
    from securecollab.runs.training import free_port
    d, _ = certs
    ports = [free_port() for _ in range(3)]
    targets = [f"localhost:{p}" for p in ports]
    ends = {r: start_endpoint(r, 3, False, tls(d, f"party-{r}"), port=ports[r], host="127.0.0.1") for r in (0, 1)}
    worlds = {}

    def form(r):
        worlds[r] = form_world(ends[r][1], targets, tls(d, f"party-{r}"), form_timeout_s=30)

    first = threading.Thread(target=form, args=(0,))
    first.start()  # party 0 hears party 1's first nonce, then waits for party 2
    for _ in range(100):
        if 0 in ends[1][1].heard:
            break
        threading.Event().wait(0.05)
    assert 0 in ends[1][1].heard
    stale = ends[1][1].nonce
    ends[1][0].stop(grace=None)
    ends[1] = start_endpoint(1, 3, False, tls(d, "party-1"), port=ports[1], host="127.0.0.1")
    ends[2] = start_endpoint(2, 3, False, tls(d, "party-2"), port=ports[2], host="127.0.0.1")
    others = [threading.Thread(target=form, args=(r,)) for r in (1, 2)]
    for t in others:
        t.start()
    try:
        for t in [first, *others]:
            t.join(40)
        assert sorted(worlds) == [0, 1, 2]
        assert len({w.world_id for w in worlds.values()}) == 1
        assert ends[1][1].nonce != stale
        # the world they share works: a message from party 0 reaches party 1 under that id
        worlds[0].peers[1].post(lambda seq: object_frames(worlds[0].world_id, seq, "hello")).result(timeout=10)
        assert worlds[1].inbox.take(0, 10, is_object=True) == "hello"
        assert all(s.inbox.broken is None for _, s in ends.values())
    finally:
        for w in worlds.values():
            w.close(timeout_s=5)
        for server, _ in ends.values():
            server.stop(grace=None)


def test_a_message_its_sender_gave_up_on_does_not_break_the_next_world(certs):
    """A party restarted: a peer's message of the old world reaches the new process before its world forms,
    and waits. Its sender gives up (its deadline; or it exits to rejoin); once the new world forms, that
    message must count for nothing. (It broke each new world in turn in the container test.)"""
    d, _ = certs
    server, servicer = start_endpoint(1, 3, False, tls(d, "party-1"), port=0, host="127.0.0.1")
    returned = threading.Event()
    put = servicer.inbox.put

    def watched_put(*args, **kwargs):
        try:
            return put(*args, **kwargs)
        finally:
            returned.set()
    servicer.inbox.put = watched_put
    try:
        with pytest.raises(grpc.RpcError) as e:  # party 0, still in the old world, sends; nobody takes it
            stub_as(d, "party-0", server.port, name="party-1").Deliver(
                iter(object_frames(WORLD, 7, "old world")), timeout=1)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # the handler stops waiting when its sender goes, not after the 600 s a world may take to form
        assert returned.wait(10)
        servicer.inbox.open(bytes([1]) * 32)  # the new world forms
        threading.Event().wait(0.5)
        assert servicer.inbox.broken is None and not any(servicer.inbox.pending.values())
        stub_as(d, "party-0", server.port, name="party-1").Deliver(
            iter(object_frames(bytes([1]) * 32, 0, "new world")), timeout=5)
        assert servicer.inbox.take(0, 5, is_object=True) == "new world"
    finally:
        server.stop(grace=None)


def test_a_party_waiting_for_its_message_to_be_taken_stops_when_the_world_breaks():
    """A message to a peer that left may wait out its whole deadline (minutes); the party must not: while
    it waits, the world's other parties, started again at once, cannot form the next world without it."""
    import time
    from concurrent.futures import Future

    from securecollab.secagg.grpc_comm import wait_sent
    from securecollab.secagg.mpc_net import Inbox, World
    world = World(0, 2, WORLD, {}, Inbox(0, 2))
    threading.Timer(0.3, world.inbox.break_world, args=("party-1 restarted",)).start()
    started = time.monotonic()
    with pytest.raises(MpcError, match="party-1 restarted"):
        wait_sent(world, [Future()], timeout_s=60)
    assert time.monotonic() - started < 5
    done = Future()
    done.set_result(None)
    wait_sent(world, [done], timeout_s=1)  # answered messages: no wait, even in a broken world
    late = World(0, 2, WORLD, {}, Inbox(0, 2))
    with pytest.raises(MpcError, match="not taken within"):  # a timeout breaks the world: the party rejoins
        wait_sent(late, [Future()], timeout_s=0.3)
    assert late.inbox.broken


def test_dealer_serves_parties_only_in_order_and_party_0_alone_gets_corrections(certs):
    d, other = certs
    server = make_server(tls=tls(d, "dealer"), port=0, host="127.0.0.1")
    servicer = DealerServicer(3)
    server.add(pb_grpc.add_DealerServicer_to_server, servicer, DEALER_SERVICE)
    server.start()
    try:
        def dealer_as(who, base=d):
            return stub_as(base, who, server.port, service=pb_grpc.DealerStub, name="dealer")

        for who in ("client-0", "coordinator"):
            with pytest.raises(grpc.RpcError) as e:
                dealer_as(who).Seed(pb.SeedRequest(world=WORLD, world_size=3), timeout=5)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:
            dealer_as("party-1", other).Seed(pb.SeedRequest(world=WORLD, world_size=3), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        seeds = [dealer_as(f"party-{r}").Seed(pb.SeedRequest(world=WORLD, world_size=3), timeout=5).seed
                 for r in range(3)]
        with pytest.raises(grpc.RpcError) as e:  # a second seed for the same world: replay
            dealer_as("party-2").Seed(pb.SeedRequest(world=WORLD, world_size=3), timeout=5)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        def ask(who, seq, kind="square", args=None):
            call = args if args is not None else {"args": [torch.Size([6])], "kwargs": {}}
            req = pb.CorrelatedRequest(world=WORLD, seq=seq, kind=kind, args=encode_object(call))
            return read_message(dealer_as(who).Correlated(req, timeout=10))[2]

        with pytest.raises(grpc.RpcError) as e:
            ask("party-1", 0)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        for kind, call in (("nope", None), ("additive", {"args": [torch.Size([2]), torch.Size([2]), "system"],
                                                         "kwargs": {}}), ("square", {"args": ["x"], "kwargs": {}})):
            with pytest.raises(grpc.RpcError) as e:
                ask("party-0", 0, kind, call)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        c0 = ask("party-0", 0)
        with pytest.raises(grpc.RpcError) as e:  # replayed request number
            ask("party-0", 0)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # the parties' generators and party 0's correction make a square pair: (sum r)^2 == sum r2
        from crypten.common.rng import generate_random_ring_element
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        r = sum(generate_random_ring_element(torch.Size([6]), generator=g) for g in gens)
        r2_others = sum(generate_random_ring_element(torch.Size([6]), generator=g) for g in gens[1:])
        assert torch.equal(c0 + r2_others, r * r)
        with pytest.raises(grpc.RpcError) as e:  # well-formed, but shapes torch cannot multiply: not UNKNOWN
            ask("party-0", 1, "additive", {"args": [torch.Size([2, 3]), torch.Size([4, 5]), "matmul"], "kwargs": {}})
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot be multiplied" in e.value.details()
        assert ask("party-0", 2).shape == (6,)  # the dealer goes on serving (request 1 was used up)
    finally:
        server.stop(grace=None)
