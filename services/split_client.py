"""A split-learning client: runs the model up to the cut (and, U-shaped, the head) on its own data.

Raw inputs never leave it; in U-shaped mode neither do the labels. Its
transcript holds what it received: the gradients at the cut, the server's
outputs (U-shaped) and any client-side weights handed to it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import time
from pathlib import Path

import grpc
import numpy as np
import torch
from torch import nn

from securecollab.generated.v1 import split_pb2 as pb
from securecollab.generated.v1 import split_pb2_grpc as pb_grpc
from securecollab.models import parameters_to_arrays
from securecollab.net.certs import TlsFiles
from securecollab.net.costs import CostMeter
from securecollab.net.transport import DEFAULT_DEADLINE_S, make_channel, wait_ready
from securecollab.net.wire import decode_named, decode_tensor, encode_named, encode_tensor
from securecollab.plans import SplitPlan
from securecollab.protocols.split import distance_correlation, load_optimizer_arrays, optimizer_arrays, sgd
from securecollab.training import batch_order
from securecollab.transcript import Kind, TranscriptRecorder

log = logging.getLogger(__name__)
TURN_WAIT_S = 900.0


class _LockstepStream:
    """One bidirectional call for a turn's vanilla steps: send a batch, wait for its gradient, repeat."""

    def __init__(self, method):
        self._requests: queue.Queue = queue.Queue()
        # No deadline for a whole turn (it grows with the shard); keepalive notices a dead server.
        self._replies = method(iter(self._requests.get, None))

    def step(self, request):
        self._requests.put(request)
        return next(self._replies)

    def __enter__(self) -> "_LockstepStream":
        return self

    def __exit__(self, *exc) -> None:
        self._requests.put(None)  # ends the request stream
        if exc[0] is None:
            for _ in self._replies:  # let the call finish cleanly
                pass
        else:
            self._replies.cancel()


class SplitClient:
    def __init__(self, stub, client_id: str, index: int, plan: SplitPlan, transcript: TranscriptRecorder):
        self.stub, self.client_id, self.index, self.plan, self.transcript = stub, client_id, index, plan, transcript
        self.ds = plan.load_data()
        self.x, self.y = plan.shard(index, self.ds)
        self.model = plan.build_model(self.ds)
        self.bottom, _, self.head = plan.parts(self.model)
        # The client-side model: bottom, plus the head in U-shaped mode.
        self.mine = nn.ModuleDict({"bottom": self.bottom, **({"head": self.head} if self.head is not None else {})})
        self.opt = sgd(self.mine, plan)
        self.noise = torch.Generator().manual_seed(plan.seed * 1000 + index)
        self._stream: _LockstepStream | None = None
        self.epoch_times: list[tuple[float, float]] = []  # (start, end) of each epoch's turn, time.time()
        # Where a vanilla step's time goes (seconds, summed): waiting for the server and the server's handling
        # inside that wait; its own model part (forward; backward and optimizer step); and the rest of its side:
        # zeroing gradients, encoding the request, decoding the reply.
        self.profile = {"steps": 0, "wait_s": 0.0, "server_s": 0.0, "forward_s": 0.0, "backward_s": 0.0,
                        "messages_s": 0.0}

    def _sent(self, act: torch.Tensor) -> np.ndarray:
        """What leaves the client: the activations, with Gaussian noise if configured."""
        out = act.detach()
        if self.plan.noise_sigma:
            out = out + self.plan.noise_sigma * torch.randn(out.shape, generator=self.noise)
        return out.numpy().astype(np.float32)

    def _grad(self, msg, shape) -> torch.Tensor:
        return torch.from_numpy(decode_tensor(msg, expect_dtype=np.float32, expect_shape=shape, finite=True))

    def train_batch(self, epoch: int, step: int, xb: np.ndarray, yb: np.ndarray) -> None:
        started = time.perf_counter()
        x = torch.from_numpy(xb)
        act = self.bottom(x)
        forward_done = time.perf_counter()
        self.opt.zero_grad()
        sent = self._sent(act)
        if self.head is None:  # vanilla: labels go with the activations
            request = pb.ForwardRequest(client_id=self.client_id, epoch=epoch, step=step,
                                        activations=encode_tensor(sent), labels=encode_tensor(yb))
            sending = time.perf_counter()
            reply = self._stream.step(request)
            replied = time.perf_counter()
            grad = self._grad(reply.gradient, sent.shape)
            self.transcript.record(Kind.GRADIENT, round=epoch, step=step, sender="split-server",
                                   tensors={"gradient": grad.numpy()})
        else:
            reply = self.stub.Forward(pb.ForwardRequest(client_id=self.client_id, epoch=epoch, step=step,
                                                        activations=encode_tensor(sent)), timeout=DEFAULT_DEADLINE_S)
            outputs = torch.from_numpy(decode_tensor(reply.outputs, expect_dtype=np.float32, finite=True))
            if len(outputs) != len(sent):
                raise ValueError(f"server returned {len(outputs)} outputs for {len(sent)} inputs")
            outputs.requires_grad_(True)
            loss = nn.functional.cross_entropy(self.head(outputs), torch.from_numpy(yb))
            loss.backward()  # head gradients, and the gradient of the server's outputs
            back = self.stub.Backward(pb.BackwardRequest(client_id=self.client_id, epoch=epoch, step=step,
                                                         gradient=encode_tensor(outputs.grad.numpy())),
                                      timeout=DEFAULT_DEADLINE_S)
            grad = self._grad(back.gradient, sent.shape)
            self.transcript.record(Kind.GRADIENT, round=epoch, step=step, sender="split-server",
                                   tensors={"server_outputs": outputs.detach().numpy(), "gradient": grad.numpy()})
        backward_from = time.perf_counter()
        if self.plan.nopeek_alpha and len(x) > 1:  # one example has no distance correlation (NaN gradient)
            penalty = self.plan.nopeek_alpha * distance_correlation(x, act)
            torch.autograd.backward([act, penalty], [grad, None])  # the server's gradient, plus the penalty's
        else:
            act.backward(grad)  # backpropagates exactly the server's gradient through the bottom
        self.opt.step()
        if self.head is None:
            profile = self.profile
            profile["steps"] += 1
            profile["forward_s"] += forward_done - started
            profile["wait_s"] += replied - sending
            profile["server_s"] += reply.server_s
            profile["messages_s"] += (sending - forward_done) + (backward_from - replied)
            profile["backward_s"] += time.perf_counter() - backward_from

    def _receive_turn(self, epoch: int) -> None:
        while True:  # the other clients' turns may take longer than one wait
            try:
                reply = self.stub.AwaitTurn(pb.TurnRequest(client_id=self.client_id, epoch=epoch), timeout=TURN_WAIT_S)
                break
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                log.info("%s: still waiting for its turn in epoch %d", self.client_id, epoch)
        if not reply.previous_client:
            return  # the very first turn starts from the seeded initialisation every client shares
        shapes = {n: tuple(p.shape) for n, p in self.mine.state_dict().items()}
        weights = decode_named(reply.client_weights, expect=shapes, finite=True)
        self.mine.load_state_dict({n: torch.from_numpy(a) for n, a in weights})
        load_optimizer_arrays(self.mine, self.opt, decode_named(reply.client_optimizer, finite=True))
        self.transcript.record(Kind.CLIENT_WEIGHTS, round=epoch, sender=reply.previous_client, tensors=weights)

    def run(self) -> None:
        handoff = self.plan.hands_off
        for epoch in range(self.plan.epochs):
            if handoff:
                self._receive_turn(epoch)
            start = time.time()
            self.mine.train()
            with _LockstepStream(self.stub.Train) if self.head is None else contextlib.nullcontext() as stream:
                self._stream = stream
                for step, idx in enumerate(batch_order(len(self.x), self.plan.batch_size, self.plan.seed, epoch)):
                    self.train_batch(epoch, step, self.x[idx], self.y[idx])
            if handoff:
                self.stub.EndTurn(pb.TurnEnd(client_id=self.client_id, epoch=epoch,
                                             client_weights=encode_named(parameters_to_arrays(self.mine)),
                                             client_optimizer=encode_named(optimizer_arrays(self.mine, self.opt))),
                                  timeout=DEFAULT_DEADLINE_S)
            self.epoch_times.append((start, time.time()))
            log.info("%s: epoch %d done", self.client_id, epoch)

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits through the whole split model (the server's part over gRPC)."""
        self.mine.eval()
        out = []
        for i in range(0, len(x), 512):
            act = self.bottom(torch.from_numpy(x[i:i + 512])).numpy()
            reply = self.stub.Predict(pb.PredictRequest(client_id=self.client_id, activations=encode_tensor(act)),
                                      timeout=DEFAULT_DEADLINE_S)
            server = torch.from_numpy(decode_tensor(reply.outputs, expect_dtype=np.float32, finite=True))
            out.append((self.head(server) if self.head is not None else server).numpy())
        return np.concatenate(out)


def run_client(target: str, client_id: str, index: int, *, tls: TlsFiles, server_name: str | None = None,
               out_dir: Path | None = None) -> dict:
    """Train through the split server for every epoch; returns (and writes) result, costs and weights."""
    meter = CostMeter(client_id)
    with make_channel(target, tls=tls, meter=meter, server_name=server_name) as channel:
        wait_ready(channel, timeout=60)
        stub = pb_grpc.SplitServerStub(channel)
        plan = SplitPlan.from_json(stub.Join(pb.SplitJoinRequest(client_id=client_id), timeout=DEFAULT_DEADLINE_S).plan_json)
        record = out_dir and plan.record_transcripts
        transcript = TranscriptRecorder(out_dir / "transcripts" / f"{client_id}.jsonl" if record else None,
                                        party=client_id, role="client")
        client = SplitClient(stub, client_id, index, plan, transcript)
        client.run()
        logits = client.predict(client.ds.x_test)
        train_costs = meter.snapshot()
        stub.Finish(pb.FinishRequest(client_id=client_id), timeout=DEFAULT_DEADLINE_S)
    result = {"client_id": client_id, "num_examples": len(client.x),
              "test_accuracy": float((logits.argmax(1) == client.ds.y_test).mean()), "costs": train_costs,
              "epoch_times": client.epoch_times, "step_profile": client.profile}
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"result_{client_id}.json").write_text(json.dumps(result, indent=2))
        np.savez(out_dir / f"split_{client_id}_part.npz", **dict(parameters_to_arrays(client.mine)))
    return result
