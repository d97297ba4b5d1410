"""A secure-aggregation client: trains locally, secret-shares its update across the compute parties."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import grpc
import numpy as np

from securecollab.generated.v1 import secagg_pb2 as pb
from securecollab.generated.v1 import secagg_pb2_grpc as pb_grpc
from securecollab.models import load_arrays
from securecollab.net.certs import TlsFiles
from securecollab.net.costs import CostMeter
from securecollab.net.transport import DEFAULT_DEADLINE_S, make_channel, wait_ready
from securecollab.net.wire import iter_chunks
from securecollab.plans import SecAggPlan, client_data
from securecollab.poisoning import Malice, behaviour
from securecollab.protocols.fedavg import client_delta
from securecollab.secagg.sharing import Share, client_shares, to_wire
from securecollab.training import accuracy
from securecollab.transcript import Kind, TranscriptRecorder
from services.common import receive_global_model

log = logging.getLogger(__name__)
# Fault injection for dropout tests: where in which round this client vanishes.
DROP_PHASES = ("before_upload", "mid_upload", "partial_upload", "after_upload")
# What a failed compute party or an aborted round looks like to a client.
ROUND_LOST = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION)
COORDINATOR_RESTART_S = 600.0  # how long a client waits for a restarted coordinator


def call_coordinator(method, request, *, timeout: float, client_id: str):
    """A coordinator call that outlasts a coordinator restart: it resumes its saved rounds, so ask it again."""
    deadline = time.monotonic() + COORDINATOR_RESTART_S
    while True:
        try:
            return method(request, timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            log.warning("%s: coordinator unavailable (%s); asking again when it is back", client_id, e.details())
            time.sleep(1.0)


def share_messages(client_id: str, round_: int, share: Share, *, limit_chunks: int | None = None):
    """The SubmitShare stream: header, then the dense share in chunks of its ring's words (none for a seed)."""
    yield pb.ShareChunk(header=pb.ShareHeader(client_id=client_id, round=round_, party=share.party,
                                              length=share.length, seed=share.seed or b""))
    if share.dense is not None:
        for i, chunk in enumerate(iter_chunks(to_wire(share.dense, share.bits))):
            if limit_chunks is not None and i >= limit_chunks:
                os._exit(3)  # simulated crash mid-upload
            yield pb.ShareChunk(chunk=chunk)


def upload(client_id: str, round_: int, vector: np.ndarray, party_stubs: list, plan: SecAggPlan,
           drop: str | None = None, *, honest: bool = True) -> None:
    """Share `vector` across the parties. An honest client refuses (ValueError) an update the plan's ring
    cannot sum (a malicious one sends it anyway: it wraps around mod 2^32)."""
    shares = client_shares(client_id, round_, vector, plan.n_parties, compress=plan.seed_compression,
                           bits=plan.share_bits, sum_of=plan.training.num_clients if honest else None)
    for i, (stub, share) in enumerate(zip(party_stubs, shares)):
        if drop == "partial_upload" and i == 1:
            os._exit(3)  # reached only party 0
        stub.SubmitShare(share_messages(client_id, round_, share,
                                        limit_chunks=0 if drop == "mid_upload" and share.dense is not None else None),
                         timeout=DEFAULT_DEADLINE_S, wait_for_ready=True)  # a restarting party gets a minute


def run_client(target: str, client_id: str, index: int, *, tls: TlsFiles, server_name: str | None = None,
               out_dir: Path | None = None, drop: str | None = None, drop_round: int = 0,
               boost: float = 1.0, malice: Malice | None = None) -> dict:
    """Take part until training is done; `drop`/`boost` inject faults (vanish; send a boosted update); with
    `malice` the client is malicious (securecollab.poisoning)."""
    meter = CostMeter(client_id)
    transcript = TranscriptRecorder(out_dir / "transcripts" / f"{client_id}.jsonl" if out_dir else None,
                                    party=client_id, role="client")
    channel = make_channel(target, tls=tls, meter=meter, server_name=server_name)
    wait_ready(channel, timeout=120)
    coord = pb_grpc.CoordinatorStub(channel)
    join = call_coordinator(coord.Join, pb.SecAggJoinRequest(client_id=client_id), timeout=DEFAULT_DEADLINE_S,
                            client_id=client_id)
    plan = SecAggPlan.from_json(join.plan_json)
    parties = []
    for t, name in zip(join.party_targets, join.party_names):
        ch = make_channel(t, tls=tls, meter=meter, server_name=name)
        wait_ready(ch, timeout=120)
        parties.append(pb_grpc.ComputePartyStub(ch))
    ds, x, y = client_data(plan.training, index)
    model = plan.training.build_model(ds)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    acts = behaviour(malice, plan.training.num_clients) if malice else None
    round_ = 0
    while True:
        info = call_coordinator(coord.GetRound, pb.RoundRequest(client_id=client_id, round=round_), timeout=3600,
                                client_id=client_id)
        params = receive_global_model(info, shapes, transcript, "coordinator")
        if info.done:
            load_arrays(model, params)
            break
        round_ = info.round
        delta = client_delta(model, plan.training, round_, params, x, y, index, acts,
                             malice.from_round if malice else 0)
        dropping = drop if drop and round_ == drop_round else None
        if dropping == "before_upload":
            os._exit(3)
        vector = np.append(delta * boost, 1.0)
        try:
            upload(client_id, round_, vector, parties, plan, dropping, honest=malice is None)
            if dropping == "after_upload":
                os._exit(3)  # shares are with every party: this client still counts
            # The shares are with every party now: a restarted coordinator still wants this report.
            call_coordinator(coord.ReportUploaded, pb.UploadReport(client_id=client_id, round=round_),
                             timeout=DEFAULT_DEADLINE_S, client_id=client_id)
        except grpc.RpcError as e:
            # A compute party failed (the coordinator aborts the round) or the round was aborted
            # already: this update is lost, and the client takes part in the next round.
            if e.code() not in ROUND_LOST:
                raise
            log.warning("%s: round %d lost (%s: %s); waiting for the next round", client_id, round_,
                        e.code().name, e.details())
            transcript.record(Kind.ROUND_LOST, round=round_, sender=client_id,
                              meta={"status": e.code().name, "details": e.details()})
        round_ += 1
    result = {"client_id": client_id, "num_examples": len(x), "epsilon": plan.training.dp_epsilon(len(x)), "test_accuracy": accuracy(model, ds.x_test, ds.y_test),
              "costs": meter.snapshot()}
    if out_dir:
        (out_dir / f"result_{client_id}.json").write_text(json.dumps(result, indent=2))
    return result
