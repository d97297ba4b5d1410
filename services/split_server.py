"""The split-learning server: runs the model past the cut; sees activations, gradients (and, vanilla, labels).

Its transcript is the honest-but-curious server's view: every batch of
activations (with labels in vanilla mode), the gradients it returned, in
U-shaped mode the gradients of its outputs, and any client-side weights
handed off through it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from securecollab.errors import ProtocolError
from securecollab.generated.v1 import split_pb2 as pb
from securecollab.generated.v1 import split_pb2_grpc as pb_grpc
from securecollab.models import parameters_to_arrays
from securecollab.net.certs import TlsFiles
from securecollab.net.costs import CostMeter
from securecollab.net.transport import make_server, wait_budget
from securecollab.net.wire import decode_named, decode_tensor, encode_named, encode_tensor
from securecollab.plans import SplitPlan
from securecollab.protocols.split import SplitServerState
from securecollab.transcript import Kind, TranscriptRecorder
from services.common import refusals, require_caller, rpc_errors, write_port_file

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["SplitServer"].full_name
TURN_WAIT_S = 600.0
MAX_PREDICT_ROWS = 4096


class SplitServicer(pb_grpc.SplitServerServicer):
    def __init__(self, state: SplitServerState, transcript: TranscriptRecorder):
        self.state = state
        self.transcript = transcript

    def _caller(self, client_id: str, context) -> None:
        self.state.check_client(client_id)
        require_caller(context, client_id)

    @rpc_errors
    def Join(self, request, context):
        self._caller(request.client_id, context)
        return pb.SplitJoinReply(plan_json=self.state.plan.to_json())

    @rpc_errors
    def AwaitTurn(self, request, context):
        self._caller(request.client_id, context)
        wait = wait_budget(context, TURN_WAIT_S)
        previous, weights, momentum = self.state.await_turn(request.client_id, request.epoch, wait)
        return pb.TurnReply(epoch=request.epoch, previous_client=previous, client_weights=encode_named(weights),
                            client_optimizer=encode_named(momentum))

    @rpc_errors
    def EndTurn(self, request, context):
        self._caller(request.client_id, context)
        weights = decode_named(request.client_weights, expect=self.state.client_shapes, finite=True,
                               expect_dtype=np.float32)
        momentum = decode_named(request.client_optimizer, finite=True, expect_dtype=np.float32)
        for name, array in momentum:
            if self.state.client_param_shapes.get(name) != array.shape:
                raise ProtocolError("INVALID_ARGUMENT", f"momentum buffer {name!r} does not fit the client-side model")
        self.state.end_turn(request.client_id, request.epoch, weights, momentum)
        self.transcript.record(Kind.CLIENT_WEIGHTS, round=request.epoch, sender=request.client_id, tensors=weights)
        return pb.TurnAck()

    @rpc_errors
    def Forward(self, request, context):
        return self._vanilla_step(request, context) if self.state.plan.mode == "vanilla" else self._forward(request, context)

    def _vanilla_step(self, request, context, defer_step: bool = False):
        if self.state.plan.mode != "vanilla":
            raise ProtocolError("FAILED_PRECONDITION", "Train streams vanilla steps; U-shaped mode uses Forward/Backward")
        return self._forward(request, context, defer_step)

    def _forward(self, request, context, defer_step: bool = False):
        t0 = time.perf_counter()
        self._caller(request.client_id, context)
        act = decode_tensor(request.activations, expect_dtype=np.float32, finite=True)
        labels = decode_tensor(request.labels, expect_dtype=np.int64) if request.HasField("labels") else None
        result, loss = self.state.forward(request.client_id, request.epoch, request.step, act, labels,
                                          defer_step=defer_step)
        tensors = {"activations": act, **({"labels": labels} if labels is not None else {})}
        if self.state.plan.mode == "vanilla":
            self.transcript.record(Kind.BATCH, round=request.epoch, step=request.step, sender=request.client_id,
                                   tensors={**tensors, "gradient_returned": result})
            return pb.ForwardReply(gradient=encode_tensor(result), loss=loss, server_s=time.perf_counter() - t0)
        self.transcript.record(Kind.BATCH, round=request.epoch, step=request.step, sender=request.client_id,
                               tensors={**tensors, "outputs_returned": result})
        return pb.ForwardReply(outputs=encode_tensor(result), server_s=time.perf_counter() - t0)

    def Train(self, request_iterator, context):
        """Forward, batch after batch, on one stream; a refused batch ends the stream with its status."""
        for request in request_iterator:
            with refusals(context):
                reply = self._vanilla_step(request, context, defer_step=True)
            yield reply
            # Resumed once the reply is on its way: the step overlaps the client's backward pass.
            self.state.flush()

    @rpc_errors
    def Backward(self, request, context):
        self._caller(request.client_id, context)
        grad = decode_tensor(request.gradient, expect_dtype=np.float32, finite=True)
        result = self.state.backward(request.client_id, request.epoch, request.step, grad)
        self.transcript.record(Kind.OUTPUT_GRADIENT, round=request.epoch, step=request.step, sender=request.client_id,
                               tensors={"gradient": grad, "gradient_returned": result})
        return pb.BackwardReply(gradient=encode_tensor(result))

    @rpc_errors
    def Predict(self, request, context):
        self._caller(request.client_id, context)
        act = decode_tensor(request.activations, expect_dtype=np.float32, finite=True)
        if act.ndim == 0 or len(act) > MAX_PREDICT_ROWS:
            raise ProtocolError("INVALID_ARGUMENT", f"at most {MAX_PREDICT_ROWS} rows per Predict")
        out = self.state.predict(act)
        self.transcript.record(Kind.PREDICT, round=0, sender=request.client_id, tensors={"activations": act})
        return pb.PredictReply(outputs=encode_tensor(out))

    @rpc_errors
    def Finish(self, request, context):
        self._caller(request.client_id, context)
        self.state.finish(request.client_id)
        log.info("%s finished (%d/%d)", request.client_id, len(self.state.finished), len(self.state.clients))
        return pb.FinishReply()


def serve(plan: SplitPlan, *, tls: TlsFiles, port: int = 0, host: str = "[::]",
          out_dir: Path | None = None, port_file: Path | None = None, block: bool = True):
    """Serve until every client has finished (block=True), then write the server part's weights and costs."""
    meter = CostMeter("split-server")
    state = SplitServerState(plan)
    record = out_dir and plan.record_transcripts
    transcript = TranscriptRecorder(out_dir / "transcripts" / "split-server.jsonl" if record else None,
                                    party="split-server", role="split")
    transcript.record(Kind.PLAN, round=0, sender="split-server", meta={"plan": json.loads(plan.to_json())})  # its own knowledge
    # Each client waiting in AwaitTurn holds a server thread: leave threads for the client whose turn it is.
    server = make_server(tls=tls, port=port, host=host, meter=meter, max_workers=plan.num_clients + 16)
    server.add(pb_grpc.add_SplitServerServicer_to_server, SplitServicer(state, transcript), SERVICE)
    server.start()
    write_port_file(port_file, server.port)
    log.info("split server (%s, %s, cut %s) on port %d for %d clients", plan.model, plan.mode,
             plan.cut or "default", server.port, plan.num_clients)
    if not block:
        return server, state, meter
    state.all_finished.wait()
    server.stop(grace=10.0)
    state.flush()
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        np.savez(out_dir / "split_server_part.npz", **dict(parameters_to_arrays(state.part)))
        meter.write(out_dir / "costs_split-server.json")
    return server, state, meter
