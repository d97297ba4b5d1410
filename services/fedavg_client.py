"""A FedAvg client: joins the aggregator, trains locally each round, submits its weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from securecollab.generated.v1 import fedavg_pb2 as pb
from securecollab.generated.v1 import fedavg_pb2_grpc as pb_grpc
from securecollab.models import load_arrays
from securecollab.net.certs import TlsFiles
from securecollab.net.costs import CostMeter
from securecollab.net.transport import DEFAULT_DEADLINE_S, make_channel, wait_ready
from securecollab.net.wire import encode_named
from securecollab.plans import FedAvgPlan, client_data
from securecollab.poisoning import Malice, behaviour
from securecollab.protocols.fedavg import client_delta, local_update, params_of
from securecollab.training import accuracy
from securecollab.transcript import TranscriptRecorder
from services.common import receive_global_model

log = logging.getLogger(__name__)
# A round waits for the slowest client's local training.
ROUND_WAIT_S = 600.0


def run_client(target: str, client_id: str, index: int, *, tls: TlsFiles, server_name: str | None = None,
               out_dir: Path | None = None, malice: Malice | None = None) -> dict:
    """Take part in every round; returns (and writes) this client's result and costs. With `malice` the client
    is malicious (securecollab.poisoning)."""
    meter = CostMeter(client_id)
    transcript = TranscriptRecorder(out_dir / "transcripts" / f"{client_id}.jsonl" if out_dir else None,
                                    party=client_id, role="client")
    with make_channel(target, tls=tls, meter=meter, server_name=server_name) as channel:
        wait_ready(channel, timeout=60)
        stub = pb_grpc.FedAvgAggregatorStub(channel)
        reply = stub.Join(pb.JoinRequest(client_id=client_id), timeout=DEFAULT_DEADLINE_S)
        plan = FedAvgPlan.from_json(reply.plan_json)
        ds, x, y = client_data(plan, index)
        model = plan.build_model(ds)
        shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
        acts = behaviour(malice, plan.num_clients) if malice else None
        round_ = 0
        while True:
            m = stub.GetModel(pb.ModelRequest(client_id=client_id, round=round_), timeout=ROUND_WAIT_S)
            params = receive_global_model(m, shapes, transcript, "aggregator")
            if m.done:
                load_arrays(model, params)
                break
            round_ = m.round
            if acts is None:
                update = local_update(model, plan, round_, params, x, y, index)
            else:
                update = params_of(params, client_delta(model, plan, round_, params, x, y, index, acts,
                                                        malice.from_round))
            stub.SubmitUpdate(pb.ClientUpdate(client_id=client_id, round=round_, num_examples=len(x),
                                              params=encode_named(update)), timeout=DEFAULT_DEADLINE_S)
            log.info("%s: round %d submitted", client_id, round_)
            round_ += 1
    result = {"client_id": client_id, "num_examples": len(x), "epsilon": plan.dp_epsilon(len(x)), "rounds": plan.rounds,
              "test_accuracy": accuracy(model, ds.x_test, ds.y_test), "costs": meter.snapshot()}
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"result_{client_id}.json").write_text(json.dumps(result, indent=2))
    return result
