"""The dealer: correlated randomness for the compute parties' MPC, as a mutual-TLS gRPC service.

It plays CrypTen's trusted third party. Per MPC world it gives each party (its certificate says
which) the seed of a generator the two share; for each correlated request of party 0, in order,
it regenerates every party's part from those generators, computes the correlation with CrypTen's
own arithmetic (``TTPServer``'s methods), and returns party 0's correction. It serves world after
world (a new world's first seed replaces the old one) and never sees a client's share. It is
trusted not to collude with a party: it knows every triple it deals.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import grpc
import torch

from securecollab.errors import ProtocolError
from securecollab.generated.v1 import mpc_pb2 as pb
from securecollab.generated.v1 import mpc_pb2_grpc as pb_grpc
from securecollab.net.certs import TlsFiles
from securecollab.net.costs import CostMeter
from securecollab.net.transport import make_server
from securecollab.secagg.crypten_compat import load_crypten
from securecollab.secagg.mpc_net import caller_rank, tensor_frames
from securecollab.secagg.mpc_objects import ObjectError, decode_object
from services.common import write_port_file

log = logging.getLogger(__name__)
SERVICE = "securecollab.v1.Dealer"
KINDS = ("additive", "square", "binary", "wraps", "B2A")
# the products CrypTen's protocols take Beaver triples for (torch function names)
OPS = ("mul", "matmul", "conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d")
SEED_WAIT_S = 60.0


class DealerServicer(pb_grpc.DealerServicer):
    def __init__(self, n_parties: int):
        self.n = n_parties
        self.cond = threading.Condition()
        self.world: bytes | None = None
        self.generators: dict[int, torch.Generator] = {}
        self.next_seq = 0
        self.served = 0

    def _refuse(self, context, e: ProtocolError):
        context.abort(getattr(grpc.StatusCode, e.code), str(e))

    def Seed(self, request, context):
        try:
            rank = caller_rank(context, self.n, own=-1)  # compute parties only
            if request.world_size != self.n:
                raise ProtocolError("FAILED_PRECONDITION", f"this dealer serves worlds of {self.n} parties, "
                                    f"not {request.world_size}")
            if len(request.world) != 32:
                raise ProtocolError("INVALID_ARGUMENT", "a world id is 32 bytes")
            with self.cond:
                if request.world != self.world:  # a new world: the old one is gone (its parties left)
                    log.info("dealer: new MPC world %s", request.world.hex()[:12])
                    self.world, self.generators, self.next_seq = request.world, {}, 0
                if rank in self.generators:
                    raise ProtocolError("FAILED_PRECONDITION", f"party-{rank} already has its seed for this world")
                seed = int.from_bytes(os.urandom(8), "big") >> 1
                self.generators[rank] = torch.Generator(device="cpu").manual_seed(seed)
                self.cond.notify_all()
        except ProtocolError as e:
            self._refuse(context, e)
        return pb.SeedReply(seed=seed)

    def Correlated(self, request, context):
        try:
            if caller_rank(context, self.n, own=-1) != 0:
                raise ProtocolError("PERMISSION_DENIED", "only party-0 asks the dealer for corrections")
            if request.kind not in KINDS:
                raise ProtocolError("INVALID_ARGUMENT", f"unknown correlation {request.kind!r}")
            try:
                call = decode_object(request.args)
            except ObjectError as e:
                raise ProtocolError("INVALID_ARGUMENT", f"arguments: {e}") from None
            args, kwargs = _arguments(request.kind, call)
            with self.cond:
                if request.world != self.world:
                    raise ProtocolError("FAILED_PRECONDITION", "request for an MPC world this dealer no longer serves")
                if request.seq != self.next_seq:
                    raise ProtocolError("INVALID_ARGUMENT", f"request {request.seq} out of order (replayed?); "
                                        f"expected {self.next_seq}")
                if not self.cond.wait_for(lambda: len(self.generators) == self.n, timeout=SEED_WAIT_S):
                    raise ProtocolError("UNAVAILABLE", f"parties {sorted(set(range(self.n)) - set(self.generators))}"
                                        " never asked for their seed")
                # Used up even if refused: party 0 counted it, and the parties drew their part before asking
                # (such a world cannot go on; party 0 leaves it).
                self.next_seq += 1
                try:
                    result = getattr(self._arithmetic(), request.kind)(*args, **kwargs)
                except (RuntimeError, ValueError, TypeError, IndexError) as e:  # arguments torch refuses
                    raise ProtocolError("INVALID_ARGUMENT", f"{request.kind}: {e}") from None
                self.served += 1
        except ProtocolError as e:
            self._refuse(context, e)
        yield from tensor_frames(self.world, request.seq, result)

    def _arithmetic(self):
        """CrypTen's TTPServer arithmetic on this world's generators (its messaging is not used)."""
        crypten = load_crypten()
        server = object.__new__(crypten.mpc.provider.ttp_provider.TTPServer)
        server.generators = [self.generators[r] for r in range(self.n)]
        server.generators_cuda = [None] * self.n
        server.device = "cpu"
        return server


def _size(value) -> torch.Size:
    if not isinstance(value, torch.Size):
        raise ProtocolError("INVALID_ARGUMENT", f"expected a size, got {type(value).__name__}")
    if value.numel() > 1 << 28:
        raise ProtocolError("INVALID_ARGUMENT", f"size {tuple(value)} is too large")
    return value


def _arguments(kind: str, call) -> tuple[list, dict]:
    """The request's positional and keyword arguments, checked against what each correlation takes."""
    if not isinstance(call, dict) or set(call) != {"args", "kwargs"} or not isinstance(call["args"], list) \
            or not isinstance(call["kwargs"], dict):
        raise ProtocolError("INVALID_ARGUMENT", "arguments must be {args: [...], kwargs: {...}}")
    args, kwargs = call["args"], call["kwargs"]
    if kind in ("additive", "binary"):
        if len(args) < 2:
            raise ProtocolError("INVALID_ARGUMENT", f"{kind} takes two sizes")
        args[0], args[1] = _size(args[0]), _size(args[1])
        if kind == "additive":
            if len(args) < 3 or args[2] not in OPS:
                raise ProtocolError("INVALID_ARGUMENT", f"additive triples are for {OPS}")
            if any(not isinstance(v, (int, tuple, list)) for v in [*args[3:], *kwargs.values()]):
                raise ProtocolError("INVALID_ARGUMENT", "operation arguments are integers or tuples of them")
        elif len(args) != 2 or kwargs:
            raise ProtocolError("INVALID_ARGUMENT", "binary takes two sizes")
    else:
        if len(args) != 1 or kwargs:
            raise ProtocolError("INVALID_ARGUMENT", f"{kind} takes one size")
        args[0] = _size(args[0])
    return args, kwargs


def serve(n_parties: int, *, tls: TlsFiles, port: int = 0, host: str = "[::]", out_dir: Path | None = None,
          port_file: Path | None = None) -> None:
    """Run the dealer until SIGTERM."""
    meter = CostMeter("dealer")
    server = make_server(tls=tls, port=port, host=host, meter=meter)
    servicer = DealerServicer(n_parties)
    server.add(pb_grpc.add_DealerServicer_to_server, servicer, SERVICE)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    write_port_file(port_file, server.port)
    log.info("dealer for %d compute parties on port %d", n_parties, server.port)
    while not stop.wait(5.0):
        if out_dir:
            meter.write(out_dir / "costs_dealer.json")
    server.stop(grace=2.0)
    if out_dir:
        meter.write(out_dir / "costs_dealer.json")
    log.info("dealer: %d correlations dealt", servicer.served)
