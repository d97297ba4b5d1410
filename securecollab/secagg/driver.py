"""The coordinator's round driver: close each round over the compute parties, reveal only the aggregate.

For every round: wait for the clients' upload reports, ask each party which
clients it holds, settle the included set, ask every party to aggregate it in
MPC, and reconstruct the revealed aggregate from the parties' result shares.
A party that fails aborts the round; the driver has the others form a new MPC
world and opens the next round from the same global model.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass

import grpc
import numpy as np

from securecollab.errors import ProtocolError, TooFewClients
from securecollab.generated.v1 import secagg_pb2 as pb
from securecollab.generated.v1 import secagg_pb2_grpc as pb_grpc
from securecollab.net.certs import TlsFiles
from securecollab.net.costs import CostMeter
from securecollab.net.failpoints import failpoint
from securecollab.net.transport import check_health, make_channel, wait_ready
from securecollab.net.wire import assemble_chunks, encode_tensor
from securecollab.protocols.fedavg import RootUpdates
from securecollab.protocols.secagg import SecAggRounds
from securecollab.secagg.sharing import decode_fixed, from_wire, reveal
from securecollab.transcript import Kind, TranscriptRecorder
from securecollab.updates import apply_aggregate

log = logging.getLogger(__name__)
MPC_TIMEOUT_S = 600.0
# A party answering with these is alive and refused: not a crash to recover from.
REFUSALS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED)


class PartyFailure(Exception):
    """A compute party did not answer or failed its part: the round is aborted, training goes on."""


@dataclass
class PartyLink:
    name: str
    target: str
    channel: grpc.Channel
    stub: pb_grpc.ComputePartyStub


def party_links(targets: list[str], names: list[str], tls: TlsFiles, meter: CostMeter) -> list[PartyLink]:
    links = []
    for target, name in zip(targets, names):
        channel = make_channel(target, tls=tls, meter=meter, server_name=name)
        wait_ready(channel, timeout=120)
        links.append(PartyLink(name, target, channel, pb_grpc.ComputePartyStub(channel)))
    return links


class RoundDriver:
    """Closes each round: who every party holds, MPC over them, reveal the aggregate (here only).

    A compute party that stops answering aborts the round (clients' uploads for it are
    refused with the reason); the driver asks the other parties to form their MPC world
    again, waits until every party serves (a restarted one included), and opens the
    next round from the same global model."""

    def __init__(self, rounds: SecAggRounds, parties: list["PartyLink"], transcript: TranscriptRecorder):
        self.rounds = rounds
        self.parties = parties
        self.transcript = transcript
        self.pool = ThreadPoolExecutor(max_workers=len(parties))
        self._root: RootUpdates | None = None  # FLTrust: the coordinator's root data, loaded once

    def _health(self, p: "PartyLink") -> str | None:
        """None when the party serves, else what is wrong."""
        try:
            status = check_health(p.channel, timeout=5.0)
        except grpc.RpcError as e:
            return f"{p.name} ({p.target}) is unreachable: {e.code().name}"
        return None if status == "SERVING" else f"{p.name} ({p.target}) is {status}"

    def check_parties(self, confirm: bool = True) -> None:
        """Raise PartyFailure for a party that does not serve; with `confirm`, only if a second
        check a second later agrees (one slow answer on a busy host must not abort a round)."""
        for p in self.parties:
            problem = self._health(p)
            if problem and confirm:
                time.sleep(1.0)
                problem = self._health(p)
            if problem:
                raise PartyFailure(problem)

    def _call(self, party: "PartyLink", fn):
        try:
            return fn(party.stub)
        except grpc.RpcError as e:
            if e.code() in REFUSALS:  # the party is fine and said no: a bug or a misconfiguration, not a crash
                raise ProtocolError(e.code().name, f"{party.name} refused: {e.details()}") from None
            raise PartyFailure(f"{party.name} ({party.target}) failed: {e.code().name}: {e.details()}") from None

    def close_round(self) -> np.ndarray:
        plan, r = self.rounds.plan, self.rounds.round
        if self.rounds.closing is None:
            self.rounds.wait_reports(check=self.check_parties)
            failpoint("coordinator.reports_closed", r)
            phases = {"uploads_closed": time.time()}
            asked = [self.pool.submit(self._call, p, lambda s: s.Held(pb.HeldRequest(round=r), timeout=30))
                     for p in self.parties]  # at once: each party answers while the others do
            done, _ = futures_wait(asked, return_when=FIRST_EXCEPTION)
            failed = next((f for f in done if f.exception()), None)
            if failed:  # at once, whichever party it was (the others' calls end within their 30 s)
                failed.result()
            held = [set(f.result().client_ids) for f in asked]
            phases["held_answered"] = time.time()
            self.rounds.set_closing(self.rounds.include(held))
        else:  # a restarted coordinator: ask again for what it asked before (the parties answer the same)
            phases = {"resumed": time.time()}
            log.info("round %d: asking the parties again for its aggregate over %d clients", r,
                     len(self.rounds.closing["included"]))
        included = self.rounds.closing["included"]
        req = pb.AggregateRequest(round=r, client_ids=included, norm_bound=plan.norm_bound, dp_sigma=plan.dp_sigma,
                                  norm_mode=plan.norm_mode, robust=plan.robust)
        if plan.robust:  # FLTrust: the direction the parties score every update against, from the root data
            req.reference.CopyFrom(encode_tensor(self._root_update(r)))
        phases["aggregate_requested"] = time.time()
        calls = []
        for p in self.parties:
            calls.append(p.stub.Aggregate(req, timeout=MPC_TIMEOUT_S))
            failpoint("coordinator.aggregate_sent_to_one", r, linger_s=1.0)
        futures = [self.pool.submit(self._call, p, lambda _, c=c: assemble_chunks(c)[1])
                   for p, c in zip(self.parties, calls)]
        try:
            # A party that dies inside the MPC leaves the others blocked in gloo (no error comes
            # back when its host vanishes): keep checking health while they compute.
            pending = set(futures)
            while pending:
                done, pending = futures_wait(pending, timeout=1.0, return_when=FIRST_EXCEPTION)
                failed = next((f for f in done if f.exception()), None)
                if failed:
                    failed.result()  # raises at once: the others may be stuck waiting for that party
                if pending:
                    self.check_parties()
            shares = [from_wire(f.result(), plan.share_bits) for f in futures]
        except (PartyFailure, ProtocolError):
            for c in calls:  # the others would wait out their MPC timeout holding the pool's threads
                c.cancel()
            raise
        phases["shares_received"] = time.time()
        aggregate = decode_fixed(reveal(shares, plan.share_bits))
        phases["revealed"] = time.time()
        self.transcript.record(Kind.AGGREGATE, round=r, sender="parties",
                               meta={"included": included, "phases": phases},
                               tensors={"aggregate": aggregate})
        failpoint("coordinator.revealed", r)
        log.info("round %d: aggregated %d clients (%s)", r, len(included), ", ".join(included))
        return aggregate, included

    def _root_update(self, round_: int) -> np.ndarray:
        if self._root is None:
            self._root = RootUpdates(self.rounds.plan.training)
        return self._root.delta(round_, self.rounds.params)

    def recover(self, round_: int, reason: str) -> None:
        """Have the parties still up re-form the MPC world; wait until all serve (or give up)."""
        for p in self.parties:
            for _ in range(3):  # a survivor that misses this would keep the old world alive
                try:
                    p.stub.Rejoin(pb.RejoinRequest(round=round_, reason=reason), timeout=10)
                    break
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        break  # the failed party: it joins the new world when it restarts
                    time.sleep(1.0)
        deadline = time.monotonic() + self.rounds.plan.party_recovery_s
        while True:
            try:
                self.check_parties(confirm=False)
                return
            except PartyFailure as e:
                if time.monotonic() > deadline:
                    raise ProtocolError("UNAVAILABLE", f"parties did not recover within "
                                        f"{self.rounds.plan.party_recovery_s:.0f}s: {e}") from None
                time.sleep(1.0)

    def run(self) -> None:
        if self.rounds.abort_reason:  # stopped while its parties recovered from an aborted round
            self._recover_and_reopen(self.rounds.round, self.rounds.abort_reason)
        while not self.rounds.done:
            r = self.rounds.round
            try:
                aggregate, included = self.close_round()
                # None accepted (or, FLTrust, none trusted): TooFewClients.
                new_params = apply_aggregate(self.rounds.params, aggregate, real_weights=bool(self.rounds.plan.robust))
            except PartyFailure as e:
                reason = str(e)
                try:  # name the party that is down, not only the survivor whose MPC step failed with it
                    self.check_parties()
                except PartyFailure as down:
                    reason = reason if str(down) in reason else f"{down}; {reason}"
                log.error("round %d aborted: %s; waiting for the compute parties to serve again", r, reason)
                self.rounds.abort(reason)
                self._recover_and_reopen(r, reason)
                continue
            except TooFewClients as e:  # the parties are fine; the next round may have enough clients
                log.warning("round %d aborted: %s", r, e)
                self.rounds.abort(str(e))
                self.rounds.reopen()
                continue
            self.rounds.advance(new_params, included)

    def _recover_and_reopen(self, r: int, reason: str) -> None:
        self.recover(r, reason)
        self.rounds.reopen()
        log.info("compute parties serve again: round %d starts from round %d's model", r + 1, r)
