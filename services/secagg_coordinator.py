"""The secure-aggregation coordinator: rounds, membership and deadlines; learns only the revealed aggregate."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from securecollab.certs import TlsFiles
from securecollab.costs import CostMeter
from securecollab.models import parameters_to_arrays
from securecollab.protocols import ProtocolError
from securecollab.protocols.secagg import SecAggPlan, SecAggRounds, apply_aggregate
from securecollab.sharing import decode_fixed, reconstruct
from securecollab.transcript import TranscriptRecorder
from securecollab.transport import make_channel, make_server, wait_ready
from securecollab.v1 import secagg_pb2 as pb
from securecollab.v1 import secagg_pb2_grpc as pb_grpc
from securecollab.wire import assemble_chunks, encode_named
from services.common import rpc_errors, write_port_file
from services.secagg_party import require_role

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
MPC_TIMEOUT_S = 600.0


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, rounds: SecAggRounds, party_targets: list[str], party_names: list[str]):
        self.rounds = rounds
        self.party_targets = party_targets
        self.party_names = party_names

    def _client(self, client_id: str, context) -> None:
        self.rounds.check_client(client_id)
        require_role(context, "client", client_id)
        if self.rounds.failure:
            raise ProtocolError("ABORTED", self.rounds.failure)

    @rpc_errors
    def Join(self, request, context):
        self._client(request.client_id, context)
        return pb.SecAggJoinReply(plan_json=self.rounds.plan.to_json(), party_targets=self.party_targets,
                                  party_names=self.party_names,
                                  seed_compression=self.rounds.plan.seed_compression)

    @rpc_errors
    def GetRound(self, request, context):
        self._client(request.client_id, context)
        wait = context.time_remaining() or 600.0
        round_, done, params = self.rounds.wait_for_round(request.round, timeout=wait, client_id=request.client_id)
        return pb.RoundInfo(round=round_, done=done, params=encode_named(params))

    @rpc_errors
    def ReportUploaded(self, request, context):
        self._client(request.client_id, context)
        return pb.UploadAck(reported=self.rounds.report(request.client_id, request.round))


class RoundDriver:
    """Closes each round: who every party holds, MPC over them, reveal the aggregate (here only)."""

    def __init__(self, rounds: SecAggRounds, stubs: list, transcript: TranscriptRecorder):
        self.rounds = rounds
        self.stubs = stubs
        self.transcript = transcript
        self.pool = ThreadPoolExecutor(max_workers=len(stubs))

    def close_round(self) -> np.ndarray:
        plan, r = self.rounds.plan, self.rounds.round
        self.rounds.wait_reports()
        phases = {"uploads_closed": time.time()}
        held = [set(s.Held(pb.HeldRequest(round=r), timeout=30).client_ids) for s in self.stubs]
        included = self.rounds.include(held)
        req = pb.AggregateRequest(round=r, client_ids=included, norm_bound=plan.norm_bound,
                                  dp_sigma=plan.dp_sigma)
        phases["aggregate_requested"] = time.time()
        futures = [self.pool.submit(lambda s: assemble_chunks(s.Aggregate(req, timeout=MPC_TIMEOUT_S))[1], s)
                   for s in self.stubs]
        shares = [np.frombuffer(f.result(), dtype="<i8").astype(np.int64) for f in futures]
        phases["shares_received"] = time.time()
        aggregate = decode_fixed(reconstruct(shares))
        phases["revealed"] = time.time()
        self.transcript.record("aggregate", round=r, sender="parties",
                               meta={"included": included, "phases": phases},
                               tensors={"aggregate": aggregate})
        log.info("round %d: aggregated %d clients (%s)", r, len(included), ", ".join(included))
        return aggregate, included

    def run(self) -> None:
        while not self.rounds.done:
            aggregate, included = self.close_round()
            self.rounds.advance(apply_aggregate(self.rounds.params, aggregate), included)


def party_stubs(targets: list[str], names: list[str], tls: TlsFiles, meter: CostMeter) -> list:
    stubs = []
    for target, name in zip(targets, names):
        channel = make_channel(target, tls=tls, meter=meter, server_name=name)
        wait_ready(channel, timeout=120)
        stubs.append(pb_grpc.ComputePartyStub(channel))
    return stubs


def serve(plan: SecAggPlan, party_targets: list[str], *, tls: TlsFiles, port: int = 0, host: str = "[::]",
          out_dir: Path | None = None, port_file: Path | None = None) -> SecAggRounds:
    """Run FedAvg rounds over secure aggregation until done; writes the final model and costs."""
    meter = CostMeter("coordinator")
    names = [f"party-{i}" for i in range(plan.n_parties)]
    rounds = SecAggRounds(plan, parameters_to_arrays(plan.training.build_model()))
    transcript = TranscriptRecorder(out_dir / "transcripts" / "coordinator.jsonl" if out_dir else None,
                                    party="coordinator", role="coordinator")
    servicer = CoordinatorServicer(rounds, party_targets, names)
    stubs = party_stubs(party_targets, names, tls, meter)
    server = make_server(tls=tls, port=port, host=host, meter=meter)
    server.add(pb_grpc.add_CoordinatorServicer_to_server, servicer, SERVICE)
    server.start()
    write_port_file(port_file, server.port)
    log.info("coordinator on port %d: %d clients, %d parties", server.port, plan.training.num_clients, plan.n_parties)
    try:
        RoundDriver(rounds, stubs, transcript).run()
    except Exception as e:  # a failed round ends training with a clear status for clients
        rounds.fail(f"round {rounds.round} failed: {e}")
        log.error(rounds.failure)
        time.sleep(2.0)  # let waiting clients hear ABORTED
        server.stop(grace=2.0)
        raise
    rounds.wait_all_finished(rounds.last_included(), timeout=30.0)
    server.stop(grace=30.0)  # returns as soon as the last responses are delivered
    if out_dir:
        np.savez(out_dir / "secagg_model.npz", **dict(rounds.params))
        meter.write(out_dir / "costs_coordinator.json")
        (out_dir / "rounds_coordinator.json").write_text(json.dumps(
            {"aggregated_at": rounds.aggregated_at, "history": rounds.history}))
    return rounds
