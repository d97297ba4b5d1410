"""The secure-aggregation coordinator: rounds, membership and deadlines; learns only the revealed aggregate."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from securecollab.errors import ProtocolError
from securecollab.generated.v1 import secagg_pb2 as pb
from securecollab.generated.v1 import secagg_pb2_grpc as pb_grpc
from securecollab.models import parameters_to_arrays
from securecollab.net.certs import TlsFiles
from securecollab.net.costs import CostMeter
from securecollab.net.transport import make_server, wait_budget
from securecollab.net.wire import encode_named
from securecollab.plans import SecAggPlan
from securecollab.protocols.round_store import RoundStore
from securecollab.protocols.secagg import SecAggRounds
from securecollab.secagg.driver import RoundDriver, party_links
from securecollab.transcript import Kind, TranscriptRecorder
from services.common import RoundReplies, require_role, rpc_errors, write_port_file

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, rounds: SecAggRounds, party_targets: list[str], party_names: list[str]):
        self.rounds = rounds
        self.party_targets = party_targets
        self.party_names = party_names
        self.replies = RoundReplies(lambda r, done, params: pb.RoundInfo(round=r, done=done,
                                                                         params=encode_named(params)))

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
    async def GetRound(self, request, context):
        # A task on the server's event loop: a thousand waiting clients hold no thread each.
        self._client(request.client_id, context)
        round_, done, params = await self.rounds.wait_for_round_async(
            request.round, timeout=wait_budget(context, 3600.0), client_id=request.client_id)
        return self.replies.reply(round_, done, params)

    @rpc_errors
    def ReportUploaded(self, request, context):
        self._client(request.client_id, context)
        return pb.UploadAck(reported=self.rounds.report(request.client_id, request.round))


def open_rounds(plan: SecAggPlan, state: Path | None, fresh: bool = False) -> SecAggRounds:
    """The round state: resumed from `state` when it holds this plan's training (refused if another plan's)."""
    store = RoundStore(state, plan.to_json()) if state else None
    if store and fresh:
        store.clear()
    rounds = SecAggRounds(plan, parameters_to_arrays(plan.training.build_model()), store)
    if rounds.resumed:
        log.info("resuming from %s: round %d (%d aggregated, %d aborted), %d upload reports in%s%s", state,
                 rounds.round, rounds.round - rounds.aborted, rounds.aborted, len(rounds.reported),
                 ", its aggregate already asked for" if rounds.closing else "",
                 "; training is finished, serving the final model" if rounds.done else "")
    return rounds


def serve(plan: SecAggPlan, party_targets: list[str], *, tls: TlsFiles, port: int = 0, host: str = "[::]",
          out_dir: Path | None = None, port_file: Path | None = None, state: Path | None = None,
          fresh: bool = False) -> SecAggRounds:
    """Run FedAvg rounds over secure aggregation until done; writes the final model and costs.

    The round state is saved in `state` (default: coordinator_state.sqlite in `out_dir`); a
    coordinator started again on the same file resumes that training, unless `fresh`."""
    meter = CostMeter("coordinator")
    names = [f"party-{i}" for i in range(plan.n_parties)]
    state = state or (out_dir / "coordinator_state.sqlite" if out_dir else None)
    rounds = open_rounds(plan, state, fresh)
    transcript = TranscriptRecorder(out_dir / "transcripts" / "coordinator.jsonl" if out_dir else None,
                                    party="coordinator", role="coordinator", resume=rounds.resumed)
    if not rounds.resumed:  # its own knowledge, which attacks on its transcript may use
        transcript.record(Kind.PLAN, round=0, sender="coordinator", meta={"plan": json.loads(plan.to_json())})
    servicer = CoordinatorServicer(rounds, party_targets, names)
    parties = party_links(party_targets, names, tls, meter)
    # Clients waiting for the next round wait as tasks on the server's event loop (GetRound is asynchronous);
    # the threads serve only the short calls (Join, ReportUploaded).
    server = make_server(tls=tls, port=port, host=host, meter=meter, asynchronous=True)
    server.add(pb_grpc.add_CoordinatorServicer_to_server, servicer, SERVICE)
    server.start()
    write_port_file(port_file, server.port)
    log.info("coordinator on port %d: %d clients, %d parties", server.port, plan.training.num_clients, plan.n_parties)
    try:
        RoundDriver(rounds, parties, transcript).run()
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
