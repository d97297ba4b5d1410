"""Secure aggregation of secret-shared client updates inside CrypTen MPC.

Each compute party holds, for every client of a round, one additive share of
that client's update: int64 in CrypTen's fixed-point encoding (scale 2^16,
ring Z_2^64). :func:`aggregate_round` turns those shares into MPCTensors
without re-encoding, computes an aggregation rule on them, and returns only
this party's share of the result. Nothing is revealed here: not the updates,
not their norms, not which clients passed.

Transports. ``grpc`` (the default): the parties' MPC traffic runs over mutual TLS between
their own endpoints (securecollab.secagg.mpc_net, grpc_comm), and the dealer is a mutual-TLS
service (services/secagg_dealer.py); nothing a peer sends is unpickled. ``gloo`` (INSECURE,
kept only to compare): CrypTen's own torch.distributed world, plaintext TCP with pickled
objects and a rendezvous store anyone reaching its port can write to; described below.

Worlds (gloo). ``n`` compute parties take ranks ``0..n-1``. When the rule needs
multiplications (a norm bound), Beaver triples come from a separate dealer
process running CrypTen's ``TTPServer`` (provider "TTP"), never from
CrypTen's default trusted-first-party provider, in which party 0 would know
every triple. CrypTen counts the dealer outside the world: every process,
dealer included, sets ``WORLD_SIZE=n``; the dealer takes ``RANK=n`` and
CrypTen opens a process group of ``n + 1``. The dealer exits when party 0
calls :func:`shutdown` (CrypTen sends it "terminate"), or when a party's
connection drops.

What is computed is an aggregation rule's ``in_mpc`` (securecollab.aggregation):
the sum, a norm bound, distributed DP noise.
"""

from __future__ import annotations

import logging
import time
import warnings
from types import ModuleType

import numpy as np
import torch

from securecollab.aggregation import AggregationRule
from securecollab.secagg.crypten_compat import init_party, load_crypten

log = logging.getLogger(__name__)

WORLD_FORMED_KEY = "securecollab/world_formed"


def _store_client(addr: str, port: int, timeout_s: float):
    import datetime

    import torch.distributed as dist
    return dist.TCPStore(addr, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def wait_for_fresh_rendezvous(master_addr: str, master_port: int, poll_s: float = 1.0) -> None:
    """Before joining: wait while the rendezvous still belongs to a world that already formed.

    After a party fails and restarts, the old party 0 may still host the old
    (broken) world's store until the coordinator tells it to leave; joining
    that store would leave this process waiting in a world nobody forms again.
    Party 0 marks its store once its world has formed (mark_world_formed), so
    a marked store is stale for anyone starting now."""
    waited = False
    while True:
        try:
            if not _store_client(master_addr, master_port, 2.0).check([WORLD_FORMED_KEY]):
                return
        except Exception:  # nothing listening: no stale world (the new party 0 will host one)
            return
        if not waited:
            log.info("the MPC rendezvous at %s:%d still serves a formed world; waiting for it to close",
                     master_addr, master_port)
            waited = True
        time.sleep(poll_s)


def mark_world_formed(master_addr: str, master_port: int) -> None:
    """Party 0, once its world has formed: later joiners must wait for a new world."""
    _store_client(master_addr, master_port, 10.0).set(WORLD_FORMED_KEY, "1")


def setup_party(rank: int, n_parties: int, master_addr: str, master_port: int, *, dealer: bool) -> ModuleType:
    """Join the MPC world as compute party ``rank`` of ``n_parties``; returns crypten.

    With ``dealer=True`` triples come from the dealer (run_dealer on another
    process with the same address/port), which must be started too, or this
    blocks in rendezvous. Without it, only linear aggregation is possible.
    """
    if not 0 <= rank < n_parties:
        raise ValueError(f"rank {rank} is not a compute party of {n_parties}")
    crypten = load_crypten()
    # The provider decides the world size at init (n, or n + 1 with a dealer),
    # so it must be set before joining.
    crypten.cfg.mpc.provider = "TTP" if dealer else "TFP"
    crypten.cfg.communicator.verbose = True  # CrypTen counts what it sends (mpc_stats): cheap at these sizes
    if rank != 0:
        wait_for_fresh_rendezvous(master_addr, master_port)
    crypten = init_party(rank, n_parties, master_addr, master_port)
    if rank == 0:
        mark_world_formed(master_addr, master_port)
    return crypten


def run_dealer(n_parties: int, master_addr: str, master_port: int) -> None:
    """Body of the dealer process: serve Beaver triples until the parties shut down.

    Returns once party 0 calls shutdown() (or a party disconnects); then leaves
    the process group itself.
    """
    crypten = load_crypten()
    crypten.cfg.mpc.provider = "TTP"
    wait_for_fresh_rendezvous(master_addr, master_port)
    # The dealer is the extra rank n of a world that CrypTen still calls size n.
    init_party(n_parties, n_parties, master_addr, master_port)
    with warnings.catch_warnings():
        # TTPServer calls crypten.init() itself; we already did (via init_party).
        warnings.filterwarnings("ignore", "CrypTen is already initialized", RuntimeWarning)
        crypten.mpc.provider.TTPServer()
    crypten.uninit()


def setup_party_grpc(servicer, targets: list[str], tls, *, dealer_target: str | None, meter=None,
                     step_timeout_s: float | None = None) -> ModuleType:
    """Form the MPC world over mutual TLS (``servicer``: this party's serving MpcPeer endpoint; ``targets``:
    every party's endpoint by rank) and start CrypTen on it; with ``dealer_target`` triples come from
    the dealer service. Raises MpcError when a peer or the dealer is missing or refuses."""
    from securecollab.secagg import dealer_client, grpc_comm
    from securecollab.secagg.mpc_net import STEP_TIMEOUT_S, form_world
    crypten = load_crypten()
    grpc_comm.install()
    dealer_client.install()
    step = step_timeout_s or STEP_TIMEOUT_S
    world = form_world(servicer, targets, tls, meter=meter, step_timeout_s=step)
    crypten.cfg.mpc.provider = "TTP" if dealer_target else "TFP"
    crypten.cfg.communicator.verbose = True  # CrypTen counts what it sends (mpc_stats): cheap at these sizes
    grpc_comm.GrpcCommunicator.pending = world
    if dealer_target:
        dealer_client.DealerClient.pending = dict(target=dealer_target, tls=tls, world_id=world.world_id,
                                                  world_size=world.world_size, rank=world.rank,
                                                  timeout_s=step, meter=meter)
    crypten.init()
    crypten.communicator.get().barrier()  # every party has its seeds (and the dealer's): the world is up
    return crypten


def shutdown() -> None:
    """Leave the MPC world; over gloo party 0 also tells the dealer (if any) to stop."""
    crypten = load_crypten()
    if crypten.is_initialized():
        crypten.uninit()
    from securecollab.secagg.dealer_client import DealerClient
    DealerClient.uninit()


def mpc_stats() -> dict:
    """CrypTen's own count of this party's MPC traffic so far (elements x 8 bytes, whichever transport), and the
    requests it made to the dealer (party 0 only: each one a round trip the others wait for)."""
    from securecollab.secagg.dealer_client import DealerClient
    crypten = load_crypten()
    if not crypten.is_initialized():
        return {}
    link = DealerClient.link
    return {**crypten.communicator.get().get_communication_stats(), "dealer_requests": link.seq if link else 0}


def aggregate_round(local_shares: list[np.ndarray], rule: AggregationRule) -> np.ndarray:
    """This party's share of `rule` applied to the round's client updates (int64; uint32 for a plain sum in
    Z_2^32).

    ``local_shares[i]`` is this party's share of client i's update (int64,
    length D, scale 2^16; for a plain sum also uint32, in Z_2^32). All parties must
    call this in lock-step with the same clients in the same order and the same rule. The shares returned by
    all parties sum (mod 2^64, or 2^32) to the fixed-point encoding of the rule's
    result, e.g. sum_i accept_i * u_i (+ noise) for a norm bound with noise.
    """
    crypten = load_crypten()
    if not crypten.is_initialized():
        raise RuntimeError("call setup_party() first")
    if rule.needs_dealer and crypten.cfg.mpc.provider != "TTP":
        raise RuntimeError(f"the {rule.name} rule needs the dealer: setup_party(..., dealer=True)")
    if not local_shares:
        raise ValueError("no client shares to aggregate")
    if rule.local_sum:  # the sum of shares mod 2^64 (or 2^32) is this party's share of the sum: no messages
        total = None
        for share in local_shares:
            share = _check_share(share, np.uint32)
            if total is not None and (share.shape, share.dtype) != (total.shape, total.dtype):
                raise ValueError(f"shares of different lengths or rings: {total.size} {total.dtype} and "
                                 f"{share.size} {share.dtype}")
            total = share.copy() if total is None else np.add(total, share, out=total)  # wraps: the ring
        return total
    updates = np.stack([_check_share(s) for s in local_shares])  # (K, D), one copy
    # precision=None keeps the default 16 fractional bits: the shares are
    # adopted as already encoded, not encoded again.
    x = crypten.mpc.MPCTensor.from_shares(torch.from_numpy(updates))
    return rule.in_mpc(x).share.numpy()


def _check_share(share, also=np.int64) -> np.ndarray:
    """A 1-D int64 share (Z_2^64), or of dtype `also` (a plain sum's uint32: Z_2^32)."""
    share = np.asarray(share)
    if share.dtype not in (np.int64, also) or share.ndim != 1:
        raise ValueError(f"each share must be a 1-D int64 (or {np.dtype(also)}) array, got {share.dtype} with "
                         f"shape {share.shape}")
    return share
