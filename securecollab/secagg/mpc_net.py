"""The compute parties' MPC traffic over gRPC with mutual TLS: each party's endpoint, and forming a world.

CrypTen's own communicator is torch.distributed over gloo: plaintext TCP, a rendezvous store that
anyone who reaches its port can write to, and pickled objects. Here every party serves one
``MpcPeer`` endpoint (protos/securecollab_wire/v1/mpc.proto) and reaches each peer through a mutual-TLS channel
from the project CA; a caller is who its certificate says (role ``party``, id ``party-<rank>``), and
anyone else is refused before a byte of its message is read. A world forms by every party saying
Hello (a fresh nonce) to every other; its id hashes all nonces, and every message carries it.

Messages between two parties are numbered; each is delivered whole and in order (one sender thread
per peer waits for the receiver's ack). The receiver takes them strictly in sequence: a replayed,
out-of-order, foreign-world, malformed or wrongly shaped message breaks the world, and so does a
peer that sends nothing within the step deadline (only the peer's last message sent again, as gRPC
retries a delivery whose answer was lost, is acknowledged and counts once). Breaking raises
:class:`MpcError` naming the peer in whatever MPC step is waiting, so a round is aborted rather than
computed on corrupted data
(the parties are crash-only: they leave and form a new world). The CrypTen interface on top is
:mod:`securecollab.secagg.grpc_comm`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from securecollab.errors import ProtocolError
from securecollab.generated.v1 import mpc_pb2 as pb
from securecollab.generated.v1 import mpc_pb2_grpc as pb_grpc
from securecollab.generated.v1 import tensor_pb2
from securecollab.net.certs import TlsFiles
from securecollab.net.costs import CostMeter
from securecollab.net.transport import make_channel, make_server, peer_identity
from securecollab.net.wire import CHUNK_BYTES, MAX_TENSOR_ELEMENTS, WireError, code_dtype, dtype_code
from securecollab.secagg.mpc_objects import ObjectError, decode_object, encode_object, same_message

log = logging.getLogger(__name__)
SERVICE = "securecollab.v1.MpcPeer"
STEP_TIMEOUT_S = 120.0  # the longest one MPC step may wait for a peer (a K x D product takes seconds)
FORM_TIMEOUT_S = 600.0  # how long a party waits for its peers to start
CLOSE_TIMEOUT_S = 15.0  # how long a leaving party waits for its peers' goodbyes
GOODBYE = "end of MPC world"  # the last message on every link (an object, so no tensor is mistaken for it)


class MpcError(RuntimeError):
    """The MPC world is broken: a peer is down, late, or sent something it must not have."""


def party_name(rank: int) -> str:
    return f"party-{rank}"


def caller_rank(context, world_size: int, own: int) -> int:
    """The calling peer's rank from its certificate; refuses anyone who is not another party of the world."""
    identity = peer_identity(context)
    prefix, _, index = identity.party_id.rpartition("-")
    if identity.role != "party" or prefix != "party" or not index.isdigit() or int(index) >= world_size \
            or int(index) == own:
        raise ProtocolError("PERMISSION_DENIED", f"{identity.role} {identity.party_id!r} is not a peer in this "
                            f"MPC world (parties 0..{world_size - 1})")
    return int(index)


# -- messages as frames ------------------------------------------------------------------------------

def tensor_frames(world: bytes, seq: int, tensor: torch.Tensor):
    """A tensor as MpcFrames of at most CHUNK_BYTES of data each (one copy: the array's own bytes)."""
    array = tensor.detach().cpu().contiguous().numpy()
    data = memoryview(array).cast("B")
    header = tensor_pb2.Tensor(dtype=dtype_code(array.dtype), shape=list(array.shape),
                               data=bytes(data[:CHUNK_BYTES]))
    parts = math.ceil(len(data) / CHUNK_BYTES) if len(data) else 1
    yield pb.MpcFrame(world=world, seq=seq, tensor=header, last=parts == 1)
    for i in range(1, parts):
        yield pb.MpcFrame(data=bytes(data[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES]), last=i == parts - 1)


def object_frames(world: bytes, seq: int, value):
    yield pb.MpcFrame(world=world, seq=seq, object=encode_object(value), last=True)


def read_message(frames) -> tuple[bytes, int, object]:
    """(world, seq, tensor or object) from one message's frames; WireError/ObjectError if malformed."""
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise WireError("empty MPC message")
    if first.HasField("tensor") == bool(first.object):
        raise WireError("an MPC message is one tensor or one object")
    if first.object:
        if not first.last:
            raise WireError("an object is one frame")
        return first.world, first.seq, decode_object(first.object)
    dtype, shape = code_dtype(first.tensor.dtype), tuple(first.tensor.shape)
    if any(d < 0 for d in shape) or len(shape) > 32 or math.prod(shape) > MAX_TENSOR_ELEMENTS:
        raise WireError(f"bad tensor shape {shape}")
    total = math.prod(shape) * dtype.itemsize
    buf, filled, frame = bytearray(total), 0, first
    chunk = first.tensor.data
    while True:
        if filled + len(chunk) > total:
            raise WireError(f"tensor data exceeds the {total} bytes its shape {shape} needs")
        buf[filled:filled + len(chunk)] = chunk
        filled += len(chunk)
        if frame.last:
            break
        frame = next(it, None)
        if frame is None:
            raise WireError(f"MPC message truncated at {filled} of {total} bytes")
        chunk = frame.data
    if filled != total:
        raise WireError(f"tensor data is {filled} bytes; shape {shape} of {dtype.name} needs {total}")
    if next(it, None) is not None:
        raise WireError("frames after the last one")
    array = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return first.world, first.seq, torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=False))


# -- receiving ---------------------------------------------------------------------------------------

class Inbox:
    """Messages from each peer, taken strictly in order; the first fault breaks the whole world."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.cond = threading.Condition()
        self.world: bytes | None = None
        self.broken: str | None = None
        self.pending: dict[int, dict[int, object]] = {j: {} for j in range(world_size)}
        self.arrived = dict.fromkeys(range(world_size), 0)  # next seq expected to arrive from each peer
        self.taken = dict.fromkeys(range(world_size), 0)
        self.last: dict[int, object] = {}  # each peer's last message, to know a resend of it

    def open(self, world: bytes) -> None:
        with self.cond:
            self.world = world
            self.cond.notify_all()

    def break_world(self, reason: str) -> None:
        with self.cond:
            if self.broken is None:
                self.broken = reason
                log.error("MPC world broken: %s", reason)
            self.cond.notify_all()

    def notify(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def put(self, src: int, world: bytes, seq: int, value, wait_s: float, sender_waits=lambda: True) -> None:
        """Take message ``seq`` of peer ``src``; ``sender_waits``: whether its sender still waits for the answer
        (call :meth:`notify` when that changes)."""
        with self.cond:
            # a faster peer may finish forming the world (and send) before this party has
            self.cond.wait_for(lambda: self.world is not None or self.broken or not sender_waits(), timeout=wait_s)
            if not sender_waits():
                # It gave up (its deadline, or its process, ended while this party formed its world): the
                # message counts for nothing, and arriving in a later world it must not break that world.
                raise ProtocolError("CANCELLED", f"{party_name(src)} no longer waits for message {seq}")
            if self.world is None:
                raise ProtocolError("UNAVAILABLE", "this party has not joined an MPC world yet")
            if world != self.world:
                self.break_world(f"{party_name(src)} is in another MPC world (restarted?)")
                raise ProtocolError("FAILED_PRECONDITION", f"message for another MPC world from {party_name(src)}")
            if seq == self.arrived[src] - 1 and same_message(self.last.get(src), value):
                return  # the same message again (a retry whose answer was lost): it counts once
            if seq != self.arrived[src]:
                kind = "replayed" if seq < self.arrived[src] else "out of order"
                self.break_world(f"{party_name(src)} sent message {seq} ({kind}; expected {self.arrived[src]})")
                raise ProtocolError("INVALID_ARGUMENT", f"message {seq} is {kind}")
            self.pending[src][seq] = self.last[src] = value
            self.arrived[src] += 1
            self.cond.notify_all()

    def take(self, src: int, timeout_s: float, like: torch.Tensor | None = None, is_object: bool = False):
        """The next message from ``src``; a tensor must have ``like``'s dtype and shape when given."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            seq = self.taken[src]
            while seq not in self.pending[src]:
                if self.broken:
                    raise MpcError(self.broken)
                left = deadline - time.monotonic()
                if left <= 0:
                    self.break_world(f"{party_name(src)} sent nothing for {timeout_s:.0f}s (down or stuck?)")
                    raise MpcError(self.broken)
                self.cond.wait(timeout=min(left, 1.0))
            value = self.pending[src].pop(seq)
            self.taken[src] += 1
        if is_object != (not isinstance(value, torch.Tensor)):
            self._fault(src, f"sent {'a tensor' if is_object else 'an object'} where the MPC expects "
                             f"{'an object' if is_object else 'a tensor'}")
        if like is not None:
            # as gloo does, only the element count must agree (CrypTen sends a 0-d seed into a (1,) buffer)
            if value.dtype != like.dtype or value.numel() != like.numel():
                self._fault(src, f"sent a {value.dtype} tensor of shape {tuple(value.shape)} where "
                                 f"{like.dtype} of shape {tuple(like.shape)} is due")
            value = value.reshape(like.shape)
        return value

    def _fault(self, src: int, what: str):
        self.break_world(f"{party_name(src)} {what}")
        raise MpcError(self.broken)


class MpcPeerServicer(pb_grpc.MpcPeerServicer):
    """A party's MPC endpoint: Hello while a world forms, then its peers' messages into the inbox."""

    def __init__(self, rank: int, world_size: int, dealer: bool, form_timeout_s: float = FORM_TIMEOUT_S):
        self.rank, self.world_size, self.dealer = rank, world_size, dealer
        self.nonce = os.urandom(32)
        self.inbox = Inbox(rank, world_size)
        self.heard: dict[int, bytes] = {}
        self.candidate = b""  # the world id this party computed, told to peers who ask while forming
        self.form_timeout_s = form_timeout_s

    def Hello(self, request, context):
        try:
            src = caller_rank(context, self.world_size, self.rank)
            if request.world_size != self.world_size or request.dealer != self.dealer:
                raise ProtocolError("FAILED_PRECONDITION", f"{party_name(src)} forms a world of "
                                    f"{request.world_size} parties (dealer {request.dealer}); this party one of "
                                    f"{self.world_size} (dealer {self.dealer})")
            if len(request.nonce) != 32:
                raise ProtocolError("INVALID_ARGUMENT", "a nonce is 32 bytes")
        except ProtocolError as e:
            context.abort(getattr(grpc.StatusCode, e.code), str(e))
        previous = self.heard.get(src)
        self.heard[src] = request.nonce
        if previous is not None and previous != request.nonce and self.inbox.world is not None:
            self.inbox.break_world(f"{party_name(src)} restarted: it is forming a new MPC world")
        return pb.MpcHello(world_size=self.world_size, nonce=self.nonce, dealer=self.dealer,
                           world=self.inbox.world or self.candidate)

    def Deliver(self, request_iterator, context):
        try:
            src = caller_rank(context, self.world_size, self.rank)
            try:
                world, seq, value = read_message(request_iterator)
            except (WireError, ObjectError) as e:
                self.inbox.break_world(f"{party_name(src)} sent a malformed message: {e}")
                raise ProtocolError("INVALID_ARGUMENT", str(e)) from None
            context.add_callback(self.inbox.notify)  # a sender that gives up ends the wait in put
            self.inbox.put(src, world, seq, value, wait_s=self.form_timeout_s, sender_waits=context.is_active)
        except ProtocolError as e:
            context.abort(getattr(grpc.StatusCode, e.code), str(e))
        return pb.MpcAck()


# -- sending and forming a world ---------------------------------------------------------------------

@dataclass
class Peer:
    """The link to one peer: its stub, and a sender thread that delivers messages one by one, in order."""

    rank: int
    target: str
    channel: grpc.Channel
    stub: pb_grpc.MpcPeerStub
    queue: queue.Queue = field(default_factory=queue.Queue)
    sent: int = 0

    def start(self, timeout_s: float) -> None:
        threading.Thread(target=self._run, args=(timeout_s,), daemon=True, name=f"mpc-to-{self.rank}").start()

    def _run(self, timeout_s: float) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            frames, done = item
            try:
                self.stub.Deliver(frames, timeout=timeout_s)
                done.set_result(None)
            except grpc.RpcError as e:
                done.set_exception(MpcError(f"{party_name(self.rank)} ({self.target}) did not take a message: "
                                            f"{e.code().name}: {e.details()}"))

    def post(self, make_frames) -> Future:
        done: Future = Future()
        self.queue.put((make_frames(self.sent), done))
        self.sent += 1
        return done


@dataclass
class World:
    rank: int
    world_size: int
    world_id: bytes
    peers: dict[int, Peer]
    inbox: Inbox
    step_timeout_s: float = STEP_TIMEOUT_S

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Leave the world. Unless it is broken, first a goodbye on every link, both ways: a peer's goodbye
        comes after every message it sent had its answer (one sender thread per link), so once all goodbyes
        are in, no peer still waits on this endpoint, which may then stop. Without it, the last message's
        answer could be lost to the receiver's exit and its sender fail a round that had completed."""
        if self.inbox.broken is None:
            sent = [p.post(lambda seq: object_frames(self.world_id, seq, GOODBYE)) for p in self.peers.values()]
            for j in self.peers:
                try:
                    said = self.inbox.take(j, timeout_s, is_object=True)
                except MpcError as e:
                    log.warning("%s left without a goodbye: %s", party_name(j), e)
                    break
                if said != GOODBYE:
                    log.warning("%s sent %r where its goodbye was due", party_name(j), said)
            for f in sent:
                try:  # the answer to our own goodbye may be lost the same way: the peer has it by then
                    f.result(timeout=timeout_s)
                except Exception:  # noqa: BLE001
                    pass
        for p in self.peers.values():
            p.queue.put(None)
            p.channel.close()


def form_world(servicer: MpcPeerServicer, targets: list[str], tls: TlsFiles, *, meter: CostMeter | None = None,
               step_timeout_s: float = STEP_TIMEOUT_S, form_timeout_s: float = FORM_TIMEOUT_S) -> World:
    """Say Hello to every peer (``targets[j]`` is party j's MPC endpoint) until each answers; the world's id
    is the hash of all nonces in rank order. Then agree on it: ask every peer for the id it computed until
    all show this one. A peer that restarted after answering has a new nonce, and the ids differ; nonces are
    then collected again, in this process, until they agree (a party that started alone in a world its peers
    do not share would break it with its first message, and every restart could repeat the race). Raises
    MpcError if a peer is missing past the deadline or refuses (another CA, another world size)."""
    rank, n = servicer.rank, servicer.world_size
    if len(targets) != n:
        raise ValueError(f"{len(targets)} MPC endpoints given for {n} parties")
    deadline = time.monotonic() + form_timeout_s
    peers = {}
    for j in range(n):
        if j != rank:
            channel = make_channel(targets[j], tls=tls, meter=meter, server_name=party_name(j))
            peers[j] = Peer(j, targets[j], channel, pb_grpc.MpcPeerStub(channel))

    def hello(j: int, world: bytes = b"") -> pb.MpcHello:
        request = pb.MpcHello(world_size=n, nonce=servicer.nonce, dealer=servicer.dealer, world=world)
        while True:
            try:
                return peers[j].stub.Hello(request, timeout=5)
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise MpcError(f"{party_name(j)} ({targets[j]}) refused to form a world: "
                                   f"{e.code().name}: {e.details()}") from None
                if time.monotonic() > deadline:
                    raise MpcError(f"{party_name(j)} ({targets[j]}) did not answer within {form_timeout_s:.0f}s")
                time.sleep(0.5)

    while True:
        nonces = {rank: servicer.nonce} | {j: hello(j).nonce for j in peers}
        world_id = hashlib.sha256(b"".join(nonces[k] for k in range(n))).digest()
        servicer.candidate = world_id
        if all(agrees(hello, j, nonces[j], world_id, deadline) for j in peers):
            break
        log.info("%s: a peer computed another MPC world id (one restarted meanwhile): collecting nonces again",
                 party_name(rank))
        time.sleep(0.2)  # give a peer with stale nonces the moment it needs to see the mismatch too
    for p in peers.values():
        p.start(step_timeout_s)
    servicer.inbox.open(world_id)
    log.info("%s: MPC world %s formed with %s", party_name(rank), world_id.hex()[:12],
             ", ".join(party_name(j) for j in sorted(peers)))
    return World(rank, n, world_id, peers, servicer.inbox, step_timeout_s)


def agrees(hello, j: int, nonce: bytes, world_id: bytes, deadline: float) -> bool:
    """Whether peer j, still holding ``nonce``, computed ``world_id``; waits while it has computed none yet."""
    while True:
        reply = hello(j, world_id)
        if reply.nonce != nonce or (reply.world and reply.world != world_id):
            return False
        if reply.world == world_id:
            return True
        if time.monotonic() > deadline:
            raise MpcError(f"{party_name(j)} computed no MPC world id in time (waiting for another peer?)")
        time.sleep(0.1)


def start_endpoint(rank: int, world_size: int, dealer: bool, tls: TlsFiles, *, port: int, host: str = "[::]",
                   meter: CostMeter | None = None):
    """Serve this party's MpcPeer endpoint; returns (server, servicer). Peers only: mutual TLS, certificates
    checked per call."""
    server = make_server(tls=tls, port=port, host=host, meter=meter)
    servicer = MpcPeerServicer(rank, world_size, dealer)
    server.add(pb_grpc.add_MpcPeerServicer_to_server, servicer, SERVICE)
    server.start()
    return server, servicer

