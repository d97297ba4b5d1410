"""The plain FedAvg aggregator service: sees every client update in the clear (the baseline)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from securecollab.generated.v1 import fedavg_pb2 as pb
from securecollab.generated.v1 import fedavg_pb2_grpc as pb_grpc
from securecollab.models import parameters_to_arrays
from securecollab.net.certs import TlsFiles
from securecollab.net.costs import CostMeter
from securecollab.net.transport import make_server, wait_budget
from securecollab.net.wire import decode_named, encode_named
from securecollab.plans import FedAvgPlan
from securecollab.protocols.fedavg import FedAvgRounds
from securecollab.transcript import Kind, TranscriptRecorder
from services.common import RoundReplies, require_caller, rpc_errors, write_port_file

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["FedAvgAggregator"].full_name


class FedAvgAggregatorServicer(pb_grpc.FedAvgAggregatorServicer):
    def __init__(self, rounds: FedAvgRounds, transcript: TranscriptRecorder, *, wait_s: float = 600.0):
        self.rounds = rounds
        self.transcript = transcript
        self.wait_s = wait_s
        self.replies = RoundReplies(lambda r, done, params: pb.ModelReply(round=r, done=done,
                                                                          params=encode_named(params)))

    def _caller(self, client_id: str, context) -> None:
        self.rounds.check_client(client_id)
        require_caller(context, client_id)

    @rpc_errors
    def Join(self, request, context):
        self._caller(request.client_id, context)
        log.info("%s joined", request.client_id)
        return pb.JoinReply(plan_json=self.rounds.plan.to_json(), num_clients=self.rounds.plan.num_clients)

    @rpc_errors
    async def GetModel(self, request, context):
        # A task on the server's event loop: a thousand waiting clients hold no thread each.
        self._caller(request.client_id, context)
        wait = wait_budget(context, self.wait_s)
        round_, done, params = await self.rounds.wait_for_round_async(request.round, timeout=wait,
                                                                      client_id=request.client_id)
        return self.replies.reply(round_, done, params)

    @rpc_errors
    def SubmitUpdate(self, request, context):
        self._caller(request.client_id, context)
        params = decode_named(request.params, expect=self.rounds.shapes, finite=True, expect_dtype=np.float32)
        received = self.rounds.submit(request.client_id, request.round, request.num_examples, params)
        # Recorded only once accepted: this is what the aggregator learned.
        self.transcript.record(Kind.UPDATE, round=request.round, sender=request.client_id,
                               meta={"num_examples": request.num_examples}, tensors=params)
        log.info("round %d: update from %s (%d/%d)", request.round, request.client_id,
                 received, self.rounds.plan.num_clients)
        return pb.UpdateAck(round=request.round, received=received)


def serve(plan: FedAvgPlan, *, tls: TlsFiles, port: int = 0, host: str = "[::]",
          out_dir: Path | None = None, port_file: Path | None = None, block: bool = True):
    """Run the aggregator until training finishes (block=True) or return the started server."""
    meter = CostMeter("aggregator")
    initial = parameters_to_arrays(plan.build_model())
    rounds = FedAvgRounds(plan, initial)
    record = out_dir and plan.record_transcripts
    transcript = TranscriptRecorder(out_dir / "transcripts" / "aggregator.jsonl" if record else None,
                                    party="aggregator", role="aggregator")
    transcript.record(Kind.PLAN, round=0, sender="aggregator", meta={"plan": json.loads(plan.to_json())})  # its own knowledge
    # Clients waiting for the next round wait as tasks on the server's event loop (GetModel is asynchronous);
    # the threads serve the uploads.
    server = make_server(tls=tls, port=port, host=host, meter=meter, asynchronous=True)
    servicer = FedAvgAggregatorServicer(rounds, transcript)
    server.add(pb_grpc.add_FedAvgAggregatorServicer_to_server, servicer, SERVICE)
    server.start()
    write_port_file(port_file, server.port)
    log.info("FedAvg aggregator on port %d: %d clients, %d rounds", server.port, plan.num_clients, plan.rounds)
    if not block:
        return server, rounds, meter
    rounds.wait_for_round(plan.rounds, timeout=None)
    if not rounds.wait_all_finished(plan.client_ids(), timeout=60.0):
        log.warning("not every client fetched the final model")
    server.stop(grace=30.0)  # returns as soon as the last responses are delivered
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        np.savez(out_dir / "fedavg_model.npz", **dict(rounds.params))
        meter.write(out_dir / "costs_aggregator.json")
        (out_dir / "rounds_aggregator.json").write_text(json.dumps({"aggregated_at": rounds.aggregated_at}))
    return server, rounds, meter
