"""A compute party's link to the dealer service, in place of CrypTen's ``TTPClient``.

CrypTen's trusted-third-party provider (``TrustedThirdParty``: Beaver triples, squares, binary
triples, wrap counts, B2A bits) stays as it is. It asks its client for two things: the generator
this party shares with the dealer, and — party 0 only — the correction tensor of each request.
Here both come over mutual TLS from the ``Dealer`` service (protos/securecollab_wire/v1/mpc.proto): the seed
once per world, corrections in order, numbered, as tensors; request arguments travel as
canonical JSON (mpc_objects), never pickled. Install with :func:`install` before ``crypten.init()``.
"""

from __future__ import annotations

import grpc
import torch

from securecollab.generated.v1 import mpc_pb2 as pb
from securecollab.generated.v1 import mpc_pb2_grpc as pb_grpc
from securecollab.net.certs import TlsFiles
from securecollab.net.costs import CostMeter
from securecollab.net.transport import make_channel, wait_ready
from securecollab.secagg.crypten_compat import load_crypten
from securecollab.secagg.mpc_net import MpcError, read_message
from securecollab.secagg.mpc_objects import encode_object

crypten = load_crypten()
DEALER_ID = "dealer"


class DealerLink:
    """What ``TTPClient.get()`` returns: this party's generator, and party 0's requests to the dealer."""

    def __init__(self, target: str, tls: TlsFiles, world_id: bytes, world_size: int, rank: int,
                 timeout_s: float, meter: CostMeter | None = None):
        self.target, self.world_id, self.rank, self.timeout_s = target, world_id, rank, timeout_s
        self.channel = make_channel(target, tls=tls, meter=meter, server_name=DEALER_ID)
        self.stub = pb_grpc.DealerStub(self.channel)
        try:
            wait_ready(self.channel, timeout=timeout_s)
            seed = self.stub.Seed(pb.SeedRequest(world=world_id, world_size=world_size), timeout=timeout_s).seed
        except (grpc.RpcError, TimeoutError) as e:
            raise MpcError(f"the dealer ({target}) gave no seed: {_why(e)}") from None
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.seq = 0

    def get_generator(self, device=None):
        if device is not None and torch.device(device).type != "cpu":
            raise MpcError("the dealer serves CPU generators only")
        return self.generator

    def ttp_request(self, func_name, device, *args, **kwargs):
        if self.rank != 0:
            raise MpcError("only party 0 asks the dealer for corrections")
        request = pb.CorrelatedRequest(world=self.world_id, seq=self.seq, kind=func_name,
                                       args=encode_object({"args": list(args), "kwargs": kwargs}))
        self.seq += 1
        try:
            _, _, result = read_message(self.stub.Correlated(request, timeout=self.timeout_s))
        except grpc.RpcError as e:
            raise MpcError(f"the dealer ({self.target}) failed request {request.seq} ({func_name}): {_why(e)}") from None
        if not isinstance(result, torch.Tensor) or result.dtype != torch.long:
            raise MpcError(f"the dealer answered request {request.seq} with something other than an int64 tensor")
        return result

    def close(self):
        self.channel.close()


def _why(e) -> str:
    return f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else str(e)


class DealerClient:
    """Stands in for CrypTen's ``TTPClient`` class: the same static _init/get/uninit."""

    pending: dict | None = None  # DealerLink's arguments, set before crypten.init()
    link: DealerLink | None = None

    @staticmethod
    def _init():
        if DealerClient.link is None:
            if DealerClient.pending is None:
                raise RuntimeError("no dealer configured for this MPC world")
            DealerClient.link, DealerClient.pending = DealerLink(**DealerClient.pending), None

    @staticmethod
    def get():
        if DealerClient.link is None:
            raise RuntimeError("the dealer link is not initialized")
        return DealerClient.link

    @staticmethod
    def uninit():
        if DealerClient.link is not None:
            DealerClient.link.close()
        DealerClient.link = None


def install() -> None:
    """CrypTen's TTP provider (and crypten.init) look TTPClient up in its module at each call."""
    crypten.mpc.provider.ttp_provider.TTPClient = DealerClient
