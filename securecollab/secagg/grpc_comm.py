"""CrypTen's ``Communicator`` interface on the parties' mutual-TLS world (securecollab.secagg.mpc_net).

CrypTen's protocols stay as they are; only the transport under them changes. Collectives are
point-to-point messages between the n parties (n is 2 or 3 here, so all-to-all costs no more
than a tree), combined in rank order so that every party gets bit-identical results. Objects
go through :mod:`securecollab.secagg.mpc_objects`, never pickle. Install with
:func:`install` before ``crypten.init()``: CrypTen's ``communicator.get()`` then returns this.
"""

from __future__ import annotations

import concurrent.futures
import time

import torch
from torch.distributed import ReduceOp

from securecollab.secagg.crypten_compat import load_crypten
from securecollab.secagg.mpc_net import MpcError, World, object_frames, tensor_frames

crypten = load_crypten()
from crypten.communicator import Communicator  # noqa: E402  (after the torch-compatibility patches)
from crypten.communicator.communicator import _logging  # noqa: E402


BROKEN_POLL_S = 0.2  # how often a party waiting for its message to be taken looks whether the world broke


def wait_sent(world: World, futures, timeout_s: float) -> None:
    """Wait until each message was taken; MpcError as soon as the world is broken (or, after ``timeout_s``,
    breaking it). A message to a peer that left may wait out its deadline to fail, and meanwhile this party
    would keep the world's other parties, which start again at once, out of the next world."""
    deadline = time.monotonic() + timeout_s
    for f in futures:
        while not f.done():
            if world.inbox.broken:
                raise MpcError(world.inbox.broken)
            left = deadline - time.monotonic()
            if left <= 0:
                world.inbox.break_world(f"a message was not taken within {timeout_s:.0f}s")
                raise MpcError(world.inbox.broken)
            concurrent.futures.wait([f], timeout=min(left, BROKEN_POLL_S))
        f.result()


class _Done:
    """What isend/irecv return: CrypTen only calls wait() (and is_completed)."""

    def __init__(self, wait):
        self._wait, self._done = wait, False

    def wait(self):
        if not self._done:
            self._wait()
            self._done = True
        return True

    def is_completed(self):
        return self._done


def _combine(a: torch.Tensor, b: torch.Tensor, op) -> torch.Tensor:
    if op == ReduceOp.SUM:
        return a + b  # int64 wraps mod 2^64, as CrypTen's ring needs
    if op == ReduceOp.BXOR:
        return a ^ b
    raise ValueError(f"reduce op {op} is not used by CrypTen's protocols")


class GrpcCommunicator(Communicator):
    """One party's view of a formed :class:`World`."""

    BYTES_PER_ELEMENT = 8  # CrypTen's traffic count: int64 ring elements
    instance: GrpcCommunicator | None = None
    pending: World | None = None  # the world formed before crypten.init(), taken by initialize()

    def __init__(self, world: World):
        self.world = world
        self.rank, self.world_size = world.rank, world.world_size
        self.name = f"party-{self.rank}"
        self.ttp_initialized = False
        self.reset_communication_stats()

    # -- life cycle (classmethods CrypTen's communicator module calls) --------------------------------

    @classmethod
    def is_initialized(cls):
        return cls.instance is not None

    @classmethod
    def initialize(cls, rank=0, world_size=1, init_ttp=False):
        if cls.pending is None:
            raise RuntimeError("form the MPC world (securecollab.secagg.mpc.setup_party) before crypten.init()")
        cls.instance, cls.pending = cls(cls.pending), None

    @classmethod
    def get(cls):
        return cls.instance

    @classmethod
    def shutdown(cls):
        if cls.instance is not None:
            cls.instance.world.close()
            cls.instance = None

    # -- point to point ----------------------------------------------------------------------------------

    def _post(self, tensor: torch.Tensor, dst: int):
        world = self.world
        return world.peers[dst].post(lambda seq: tensor_frames(world.world_id, seq, tensor))

    def _take(self, src: int, like: torch.Tensor) -> torch.Tensor:
        return self.world.inbox.take(src, self.world.step_timeout_s, like=like)

    def _sent(self, futures) -> None:
        wait_sent(self.world, futures, self.world.step_timeout_s + 5)

    def _others(self):
        return [j for j in range(self.world_size) if j != self.rank]

    @_logging
    def send(self, tensor, dst):
        self._sent([self._post(tensor, dst)])

    @_logging
    def recv(self, tensor, src=None):
        return self._take(src, tensor).clone()

    def isend(self, tensor, dst):
        done = self._post(tensor, dst)
        return _Done(lambda: self._sent([done]))

    def irecv(self, tensor, src=None):
        return _Done(lambda: tensor.copy_(self._take(src, tensor)))

    # -- collectives -------------------------------------------------------------------------------------

    def _broadcast_one(self, tensor, src):
        if self.rank == src:
            self._sent([self._post(tensor, j) for j in self._others()])
            return tensor
        tensor.copy_(self._take(src, tensor))
        return tensor

    @_logging
    def broadcast(self, input, src, group=None, batched=False):
        if batched:
            return [self._broadcast_one(t, src) for t in input]
        return self._broadcast_one(input, src)

    def _gather_and_combine(self, tensor, op):
        """Every peer's tensor combined with ours, in rank order (bit-identical at every party)."""
        parts = {j: self._take(j, tensor) for j in self._others()}
        parts[self.rank] = tensor
        result = parts[0].clone()
        for j in range(1, self.world_size):
            result = _combine(result, parts[j], op)
        return result

    def _all_reduce_one(self, tensor, op):
        sends = [self._post(tensor, j) for j in self._others()]
        result = self._gather_and_combine(tensor, op)
        self._sent(sends)
        return result

    @_logging
    def all_reduce(self, input, op=ReduceOp.SUM, batched=False):
        if batched:
            return [self._all_reduce_one(t, op) for t in input]
        return self._all_reduce_one(input, op)

    def _reduce_one(self, tensor, dst, op):
        if self.rank != dst:
            self._sent([self._post(tensor, dst)])
            return None
        return self._gather_and_combine(tensor, op)

    @_logging
    def reduce(self, input, dst, op=ReduceOp.SUM, batched=False):
        if batched:
            results = [self._reduce_one(t, dst, op) for t in input]
            return results if self.rank == dst else None
        return self._reduce_one(input, dst, op)

    @_logging
    def gather(self, tensor, dst):
        if self.rank != dst:
            self._sent([self._post(tensor, dst)])
            return [None]
        return [tensor.clone() if j == self.rank else self._take(j, tensor) for j in range(self.world_size)]

    @_logging
    def all_gather(self, tensor):
        sends = [self._post(tensor, j) for j in self._others()]
        result = [tensor.clone() if j == self.rank else self._take(j, tensor) for j in range(self.world_size)]
        self._sent(sends)
        return result

    @_logging
    def scatter(self, scatter_list, src, size=None, device=None):
        if self.rank == src:
            self._sent([self._post(scatter_list[j], j) for j in self._others()])
            return scatter_list[self.rank]
        like = torch.empty(size if size is not None else scatter_list[self.rank].size(), dtype=torch.long)
        return self._take(src, like)

    def barrier(self):
        self.all_gather(torch.zeros(1, dtype=torch.long))

    # -- objects (the closed set of mpc_objects; never pickle) ------------------------------------------

    def _post_obj(self, obj, dst: int):
        world = self.world
        return world.peers[dst].post(lambda seq: object_frames(world.world_id, seq, obj))

    @_logging
    def send_obj(self, obj, dst, group=None):
        self._sent([self._post_obj(obj, dst)])

    def _take_obj(self, src: int):
        return self.world.inbox.take(src, self.world.step_timeout_s, is_object=True)

    @_logging
    def recv_obj(self, src, group=None):
        return self._take_obj(src)

    @_logging
    def broadcast_obj(self, obj, src, group=None):
        if self.rank == src:  # to every peer at once: one round trip, as a tensor's broadcast
            self._sent([self._post_obj(obj, j) for j in self._others()])
            return obj
        return self._take_obj(src)  # not recv_obj: CrypTen's count would take this one message twice

    # -- identity ----------------------------------------------------------------------------------------

    def get_world_size(self):
        return self.world_size

    def get_rank(self):
        return self.rank

    def get_ttp_rank(self):
        return self.world_size  # CrypTen's convention; the dealer here is a separate service

    def set_name(self, name):
        self.name = str(name)

    def get_name(self):
        return self.name

    def get_distributed_backend(self):
        return "grpc+mtls"


def install() -> None:
    """Make CrypTen's communicator module use GrpcCommunicator (it looks the class up at each call)."""
    crypten.communicator.DistributedCommunicator = GrpcCommunicator
