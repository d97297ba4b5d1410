"""Secure aggregation of secret-shared client updates inside CrypTen MPC.

Each compute party holds, for every client of a round, one additive share of
that client's update: int64 in CrypTen's fixed-point encoding (scale 2^16,
ring Z_2^64). :func:`aggregate_round` turns those shares into MPCTensors
without re-encoding, computes the (optionally norm-bounded, optionally
noised) sum, and returns only this party's share of the result. Nothing is
revealed here: not the updates, not their norms, not which clients passed.

Worlds. ``n`` compute parties take ranks ``0..n-1``. When the spec needs
multiplications (a norm bound), Beaver triples come from a separate dealer
process running CrypTen's ``TTPServer`` (provider "TTP"), never from
CrypTen's default trusted-first-party provider, in which party 0 would know
every triple. CrypTen counts the dealer outside the world: every process,
dealer included, sets ``WORLD_SIZE=n``; the dealer takes ``RANK=n`` and
CrypTen opens a process group of ``n + 1``. The dealer exits when party 0
calls :func:`shutdown` (CrypTen sends it "terminate"), or when a party's
connection drops.

Norm bound ("reject"): the squared L2 norm is computed exactly on the integer
encodings, sum_j (2^16 u_j)^2 = 2^32 ||u||^2, with no truncation. That saves
a round over all K*D squares, and avoids CrypTen's 3-party truncation, which
is off by 2^48 with probability ~|x|/2^64 per element (large for squares
kept at scale 2^32). The sum must stay below 2^63, so the bound test is only
meaningful for ||u|| < 2^15.5 (about 46341): a larger norm wraps around the
ring and may pass. Honest updates are far below that; stopping a malicious
client that picks wrapping inputs needs range proofs, out of scope here.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from securecollab.crypten_compat import init_party, load_crypten
from securecollab.sharing import FRAC_BITS, SCALE  # CrypTen's default encoding; shares arrive in it

log = logging.getLogger(__name__)

# Squared norms live at scale 2^32 in a signed 64-bit ring: bound^2 * 2^32 < 2^63.
MAX_NORM_BOUND = 2.0 ** ((63 - 2 * FRAC_BITS) / 2) - 1.0


@dataclass(frozen=True)
class AggregationSpec:
    """What aggregate_round computes besides the plain sum.

    norm_bound: reject (drop entirely) every update whose L2 norm exceeds it;
        decided inside MPC. Needs the dealer.
    dp_sigma: add Gaussian noise N(0, dp_sigma^2) to every coordinate of the
        sum, as n_parties independent N(0, dp_sigma^2 / n_parties) parts,
        one from each party, so no party knows the total noise.
    """

    norm_bound: float | None = None
    dp_sigma: float | None = None

    def __post_init__(self):
        if self.norm_bound is not None and not 0 < self.norm_bound <= MAX_NORM_BOUND:
            raise ValueError(f"norm_bound must be in (0, {MAX_NORM_BOUND:.0f}], got {self.norm_bound}")
        if self.dp_sigma is not None and not self.dp_sigma >= 0:
            raise ValueError(f"dp_sigma must be >= 0, got {self.dp_sigma}")

    @property
    def needs_dealer(self) -> bool:
        """True when the computation multiplies secrets (so needs Beaver triples)."""
        return self.norm_bound is not None


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


def shutdown() -> None:
    """Leave the MPC world; party 0 also tells the dealer (if any) to stop."""
    crypten = load_crypten()
    if crypten.is_initialized():
        crypten.uninit()


def aggregate_round(local_shares: list[np.ndarray], spec: AggregationSpec) -> np.ndarray:
    """This party's int64 share of the aggregate of the round's client updates.

    ``local_shares[i]`` is this party's share of client i's update (int64,
    length D, scale 2^16). All parties must call this in lock-step with the
    same clients in the same order. The shares returned by all parties sum
    (mod 2^64) to the fixed-point encoding of
    sum_i accept_i * u_i (+ noise), where accept_i = ||u_i|| <= norm_bound.
    """
    crypten = load_crypten()
    if not crypten.is_initialized():
        raise RuntimeError("call setup_party() first")
    if spec.needs_dealer and crypten.cfg.mpc.provider != "TTP":
        raise RuntimeError("a norm bound needs the dealer: setup_party(..., dealer=True)")
    if not local_shares:
        raise ValueError("no client shares to aggregate")
    updates = np.stack([_check_share(s) for s in local_shares])  # (K, D), one copy
    MPCTensor = crypten.mpc.MPCTensor

    # precision=None keeps the default 16 fractional bits: the shares are
    # adopted as already encoded, not encoded again.
    x = MPCTensor.from_shares(torch.from_numpy(updates))
    if spec.norm_bound is None:
        total = x.sum(0)
    else:
        accept = _accept_bits(x, spec.norm_bound)  # (K,) secret 0/1 at scale 1
        # One Beaver matmul (1,K) @ (K,D): the triple's product is only D long,
        # and a scale-1 bit times a scale-2^16 value needs no truncation.
        total = accept.unsqueeze(0).matmul(x).squeeze(0)
    if spec.dp_sigma:
        total = total + _distributed_noise(crypten, updates.shape[1], spec.dp_sigma)
    return total.share.numpy()


def _check_share(share) -> np.ndarray:
    share = np.asarray(share)
    if share.dtype != np.int64 or share.ndim != 1:
        raise ValueError(f"each share must be a 1-D int64 array, got {share.dtype} with shape {share.shape}")
    return share


def _accept_bits(x, norm_bound: float):
    """Secret bits [||x_i|| <= norm_bound] for the rows of the (K, D) MPCTensor x."""
    crypten = load_crypten()
    from crypten.mpc.primitives import beaver

    MPCTensor = crypten.mpc.MPCTensor
    # Same shares read as plain integers (scale 1): squaring them needs no
    # truncation, which CrypTen would otherwise do per element.
    as_ints = MPCTensor.from_shares(x.share, precision=0)
    squares = beaver.square(as_ints._tensor)  # uses the dealer's (r, r^2) pairs
    norm_sq = MPCTensor.from_shares(squares.share.sum(1), precision=0)  # 2^32 ||x_i||^2
    bound_sq = torch.tensor(math.floor(norm_bound * norm_bound * SCALE * SCALE), dtype=torch.long)
    return norm_sq.le(bound_sq)


def _distributed_noise(crypten, size: int, dp_sigma: float):
    """Secret-shared sum of one N(0, dp_sigma^2 / n) vector from every party."""
    MPCTensor = crypten.mpc.MPCTensor
    comm = crypten.communicator.get()
    n_parties, rank = comm.get_world_size(), comm.get_rank()
    # Fresh OS entropy: the noise must be unpredictable to the other parties.
    own = np.random.default_rng().standard_normal(size) * (dp_sigma / math.sqrt(n_parties))
    placeholder = torch.zeros(size, dtype=torch.float64)  # only its size matters off-source
    noise = None
    for src in range(n_parties):
        part = MPCTensor(torch.from_numpy(own) if src == rank else placeholder, src=src)
        noise = part if noise is None else noise + part
    return noise
