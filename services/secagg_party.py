"""A secure-aggregation compute party: receives one share per client over mTLS, runs the MPC in a CrypTen world."""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
from concurrent.futures import Future
from pathlib import Path

import grpc
import numpy as np

from securecollab.aggregation import secure_rule
from securecollab.aggregation.fltrust import check_reference
from securecollab.errors import ProtocolError
from securecollab.generated.v1 import secagg_pb2 as pb
from securecollab.generated.v1 import secagg_pb2_grpc as pb_grpc
from securecollab.net.certs import TlsFiles
from securecollab.net.costs import CostMeter
from securecollab.net.transport import make_server
from securecollab.net.wire import WireError, assemble_chunks, decode_tensor, iter_chunks
from securecollab.plans import SecAggPlan
from securecollab.protocols.secagg import ShareStore
from securecollab.secagg.mpc import aggregate_round, mpc_stats, setup_party, setup_party_grpc, shutdown
from securecollab.secagg.mpc_net import MpcError, start_endpoint
from securecollab.secagg.sharing import SEED_BYTES, Share, from_wire, to_wire
from securecollab.transcript import Kind, TranscriptRecorder
from services.common import require_role, rpc_errors, write_port_file

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["ComputeParty"].full_name
MAX_SHARE_LENGTH = 1 << 27  # 1 GiB of int64
EXIT_REJOIN = 75  # EX_TEMPFAIL: "start me again"
_mpc_endpoint = None


class ComputePartyServicer(pb_grpc.ComputePartyServicer):
    def __init__(self, index: int, store: ShareStore, jobs: "queue.Queue", transcript: TranscriptRecorder,
                 share_bits: int):
        self.index = index
        self.share_bits = share_bits  # the ring of shares on the wire (SecAggPlan.share_bits)
        self.store = store
        self.jobs = jobs
        self.transcript = transcript
        self.rejoining = threading.Event()  # set by a Rejoin call: this party is about to exit
        # round -> (request, its MPC job): a restarted coordinator asking again for the same
        # aggregation gets the same result shares (no fresh noise, nothing new revealed).
        self.answered: dict[int, tuple[tuple, Future]] = {}
        self._answer_lock = threading.Lock()
        self.on_rejoin = lambda: None       # set by serve(): stop serving and exit

    @rpc_errors
    def SubmitShare(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise ProtocolError("INVALID_ARGUMENT", "a share stream starts with its header")
        h = first.header
        require_role(context, "client", h.client_id)
        if h.length > MAX_SHARE_LENGTH:
            raise ProtocolError("RESOURCE_EXHAUSTED", f"share of {h.length} elements exceeds the limit")
        self.store.check_length(h.length)  # before a byte of the share is read
        if h.seed:
            if len(h.seed) != SEED_BYTES:
                raise ProtocolError("INVALID_ARGUMENT", f"seed must be {SEED_BYTES} bytes")
            if next(request_iterator, None) is not None:
                raise ProtocolError("INVALID_ARGUMENT", "a seed share carries no chunks")
            share = Share(party=h.party, seed=bytes(h.seed), length=h.length, bits=self.share_bits)
            record = {"blobs": {"seed": bytes(h.seed)}}
        else:
            chunks = (m.chunk for m in request_iterator if m.WhichOneof("part") == "chunk")
            word = self.share_bits // 8
            _, payload = assemble_chunks(chunks, max_bytes=h.length * word)
            if len(payload) != h.length * word:
                raise WireError(f"share is {len(payload)} bytes, header says {h.length} words of {word} bytes "
                                f"(this plan's ring is Z_2^{self.share_bits})")
            dense = from_wire(payload, self.share_bits)
            share = Share(party=h.party, dense=dense, length=h.length, bits=self.share_bits)
            record = {"tensors": {"share": dense}}
        held, fresh = self.store.put(h.client_id, h.round, share)
        if fresh:  # a resent copy is neither a second share nor a second record
            self.transcript.record(Kind.SHARE, round=h.round, sender=h.client_id, meta={"length": h.length},
                                   **record)
        else:
            log.info("%s sent its share for round %d again (the same bytes); acknowledged", h.client_id, h.round)
        return pb.ShareAck(round=h.round, held=held)

    @rpc_errors
    def Held(self, request, context):
        require_role(context, "coordinator")
        return pb.HeldReply(client_ids=self.store.held(request.round))

    def Aggregate(self, request, context):
        try:
            require_role(context, "coordinator")
            job = self._job_for(request)
        except ProtocolError as e:
            context.abort(getattr(grpc.StatusCode, e.code), str(e))
        result = job.result()  # the MPC runs on the main thread, in lock-step with the other parties
        if isinstance(result, BaseException):
            context.abort(grpc.StatusCode.INTERNAL, f"MPC failed: {result}")
        yield from iter_chunks(to_wire(result, self.share_bits))

    def _job_for(self, request) -> Future:
        """The MPC job of this aggregation: a new one, or the one already run for the same request."""
        reference = self._reference(request)
        key = (tuple(request.client_ids), request.norm_bound, request.dp_sigma, request.norm_mode, request.robust,
               None if reference is None else reference.tobytes())
        with self._answer_lock:
            if request.round in self.answered:
                asked, job = self.answered[request.round]
                if asked != key:
                    raise ProtocolError("FAILED_PRECONDITION", f"round {request.round} was aggregated over "
                                        f"{list(asked[0])}; another aggregation could reveal the difference")
                log.info("round %d: aggregate asked again (coordinator restarted?): same result", request.round)
                return job
            try:
                rule = secure_rule(norm_bound=request.norm_bound or None, dp_sigma=request.dp_sigma or None,
                                   norm_mode=request.norm_mode or "reject", robust=request.robust or None,
                                   reference=reference)
            except ValueError as e:
                raise ProtocolError("INVALID_ARGUMENT", f"aggregation rule: {e}") from None
            if reference is not None and self.store.lengths(request.round) - {reference.size + 1}:
                raise ProtocolError("INVALID_ARGUMENT", f"the root update has {reference.size} coordinates, "
                                    f"the updates {sorted(n - 1 for n in self.store.lengths(request.round))}")
            if self.share_bits != 64 and not rule.local_sum:
                raise ProtocolError("FAILED_PRECONDITION", f"rule {rule.name} runs in CrypTen's 64-bit ring; this "
                                    f"plan's shares are in Z_2^{self.share_bits} (a plain sum only)")
            shares = self.store.take(request.round, list(request.client_ids))
            job = Future()
            self.jobs.put((shares, rule, job))
            self.answered[request.round] = (key, job)
            for old in sorted(self.answered)[:-4]:  # a coordinator resumes only its open round
                del self.answered[old]
            return job

    @staticmethod
    def _reference(request) -> np.ndarray | None:
        """FLTrust's root update from the request: a finite float64 vector with a norm the rule can carry."""
        if not request.robust:
            return None
        try:
            g0 = decode_tensor(request.reference, expect_dtype=np.float64, finite=True)
            return check_reference(g0, g0.size)
        except (WireError, ValueError) as e:
            raise ProtocolError("INVALID_ARGUMENT", f"root update: {e}") from None

    @rpc_errors
    def Rejoin(self, request, context):
        require_role(context, "coordinator")
        if self.rejoining.is_set():
            return pb.RejoinReply(rejoining=True)
        log.warning("asked to rejoin a new MPC world (round %d aborted: %s)", request.round, request.reason)
        self.rejoining.set()
        self.on_rejoin()
        return pb.RejoinReply(rejoining=True)


def join_grpc_world(plan: SecAggPlan, index: int, tls: TlsFiles, peers: list[str] | None, dealer: str | None,
                    host: str, meter: CostMeter) -> str:
    """Serve this party's MPC endpoint and form the world over it; a party that cannot (a peer or the
    dealer missing or refusing) exits asking to be started again."""
    if not peers or len(peers) != plan.n_parties:
        raise ValueError(f"give the MPC endpoint of each of the {plan.n_parties} compute parties, in index order")
    if plan.needs_dealer and not dealer:
        raise ValueError("this plan needs the dealer (norm bound): give its address")
    port = int(peers[index].rsplit(":", 1)[1])
    global _mpc_endpoint  # serves as long as the process lives (one world per process: crash-only)
    _mpc_endpoint, servicer = start_endpoint(index, plan.n_parties, plan.needs_dealer, tls, port=port, host=host,
                                             meter=meter)
    try:
        setup_party_grpc(servicer, peers, tls, dealer_target=dealer if plan.needs_dealer else None, meter=meter)
    except MpcError as e:
        log.error("compute party %d could not form its MPC world: %s; exiting to be started again", index, e)
        os._exit(EXIT_REJOIN)
    return f"MPC over mutual TLS on {host}:{port}"


def _update_length(plan: SecAggPlan) -> int | None:
    """The plan's update length, from the model it names (built on the plan's data set, which tells the input
    shape); None, with a warning, where this host cannot read that data set."""
    try:
        return plan.training.update_length()
    except (OSError, ValueError) as e:
        log.warning("cannot read the plan's data set here (%s): shares of any length are taken, and the first "
                    "of a round fixes that round's (one client's wrong length can then spoil a round)", e)
        return None


def serve(plan: SecAggPlan, index: int, *, tls: TlsFiles, mpc_addr: str = "127.0.0.1", mpc_port: int = 29500,
          mpc_peers: list[str] | None = None, dealer: str | None = None, mpc_host: str | None = None,
          port: int = 0, host: str = "[::]", out_dir: Path | None = None, port_file: Path | None = None) -> None:
    """Run compute party `index` until SIGTERM; the CrypTen world runs on this (main) thread.

    Over ``grpc`` the party serves its MPC endpoint at the port of ``mpc_peers[index]`` (every party's MPC
    endpoint, by index) and reaches the ``dealer`` service when the plan needs one; over ``gloo``
    (insecure) it joins CrypTen's rendezvous at ``mpc_addr:mpc_port``."""
    party_id = f"party-{index}"
    meter = CostMeter(party_id)
    store = ShareStore(index, plan.training.client_ids(), min_clients=plan.min_clients,
                       length=_update_length(plan), rounds_per_client=plan.max_aborted_rounds + 2)
    transcript = TranscriptRecorder(out_dir / "transcripts" / f"{party_id}.jsonl" if out_dir and plan.training.record_transcripts else None,
                                    party=party_id, role="party", resume=True)
    jobs: queue.Queue = queue.Queue()
    server = make_server(tls=tls, port=port, host=host, meter=meter)
    servicer = ComputePartyServicer(index, store, jobs, transcript, plan.share_bits)

    def rejoin():
        # A peer failed, so this MPC world is broken (and this party's main thread may be stuck in
        # it). Parties are crash-only: leave, and let the supervisor (restart policy, StatefulSet)
        # start this party again; it then forms a new world with the others, as at first start.
        # Only shares of the aborted round are lost.
        server.set_serving(False)
        log.warning("compute party %d: exiting to rejoin a new MPC world (exit %d)", index, EXIT_REJOIN)
        try:
            server.stop(grace=1.0)  # the Rejoin reply goes out first
            if out_dir:
                meter.write(out_dir / f"costs_{party_id}.json")
        finally:
            os._exit(EXIT_REJOIN)  # a broken gloo world would hang a normal interpreter exit

    servicer.on_rejoin = lambda: threading.Thread(target=rejoin, daemon=True).start()
    server.add(pb_grpc.add_ComputePartyServicer_to_server, servicer, SERVICE)
    stop = threading.Event()

    def on_signal(*_):
        stop.set()
        jobs.put(None)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Join the CrypTen world first: a party that cannot reach its peers must not accept shares.
    if plan.mpc_transport == "grpc":
        where = join_grpc_world(plan, index, tls, mpc_peers, dealer, mpc_host or host, meter)
    else:
        setup_party(index, plan.n_parties, mpc_addr, mpc_port, dealer=plan.needs_dealer)
        where = f"INSECURE gloo world at {mpc_addr}:{mpc_port}"
    server.start()
    write_port_file(port_file, server.port)
    log.info("compute party %d on port %d (%s)", index, server.port, where)
    while not stop.is_set():
        item = jobs.get()
        if item is None:
            break
        shares, spec, job = item
        try:
            job.set_result(aggregate_round(shares, spec))
        except Exception as e:  # reported to the coordinator as INTERNAL
            log.exception("MPC failed")
            job.set_result(e)
        if out_dir:
            meter.write(out_dir / f"costs_{party_id}.json")
            (out_dir / f"mpc_stats_{party_id}.json").write_text(json.dumps(mpc_stats()))
    server.stop(grace=2.0)
    if out_dir:
        meter.write(out_dir / f"costs_{party_id}.json")
    shutdown()
    if _mpc_endpoint is not None:  # stopped before exit: a late peer call during atexit would hang the exit
        _mpc_endpoint.stop(grace=None)
