"""Model-private inference from outside the compute parties: the model owner's upload, and the querying client.

The owner splits its flat parameter vector into additive shares, one per compute party (a dense correction
for one, 32-byte seeds for the others), and never sees a query. A client splits each query the same way, calls
every party at once, and alone adds up the answer shares: logits, or in a label-only deployment only the
labels. Its transcript holds exactly that answer (the view of a querying adversary)."""

from __future__ import annotations

import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from securecollab.generated.v1 import mpc_inference_pb2 as pb
from securecollab.generated.v1 import mpc_inference_pb2_grpc as pb_grpc
from securecollab.models import parameters_to_arrays
from securecollab.net.certs import TlsFiles
from securecollab.net.costs import CostMeter
from securecollab.net.transport import make_channel, wait_ready
from securecollab.plans import MpcInferencePlan
from securecollab.secagg.mpc_model import ParamLayout
from securecollab.secagg.sharing import client_shares, encode_fixed, from_wire, reconstruct, split_shares, to_wire
from securecollab.transcript import Kind, TranscriptRecorder

log = logging.getLogger(__name__)
DEADLINE_S = 300.0  # a query waits behind the others in the parties' queue


@dataclass(frozen=True)
class Deployment:
    """What every compute party described; they must agree (and be parties 0..n-1, in order)."""

    plan: MpcInferencePlan
    input_shape: tuple[int, ...]
    num_classes: int
    param_count: int
    model_id: str

    @classmethod
    def of(cls, replies: list) -> Deployment:
        first = replies[0]
        if [r.party for r in replies] != list(range(len(replies))):
            raise ValueError(f"the targets are compute parties {[r.party for r in replies]}; give them in index "
                             "order, every one")
        keys = {(r.plan_json, tuple(r.input_shape), r.num_classes, r.param_count, r.model_id) for r in replies}
        if len(keys) != 1:
            raise ValueError("the compute parties disagree on the plan or the model they serve (an upload under "
                             "way, or parties of different deployments)")
        plan = MpcInferencePlan.from_json(first.plan_json)
        if plan.n_parties != len(replies):
            raise ValueError(f"the plan has {plan.n_parties} compute parties, {len(replies)} targets were given")
        return cls(plan, tuple(first.input_shape), first.num_classes, first.param_count, first.model_id)


class _Parties:
    """Channels to every compute party, and calls to all of them at once."""

    def __init__(self, targets: list[str], tls: TlsFiles, meter: CostMeter, server_name: str | None,
                 connect_timeout: float):
        self.channels = [make_channel(t, tls=tls, meter=meter, server_name=server_name) for t in targets]
        for target, channel in zip(targets, self.channels):
            try:
                wait_ready(channel, timeout=connect_timeout)
            except TimeoutError as e:
                raise TimeoutError(f"compute party at {target}: {e}") from None
        self.stubs = [pb_grpc.MpcInferenceStub(c) for c in self.channels]
        self.pool = ThreadPoolExecutor(max_workers=len(targets))

    def all(self, method: str, requests: list) -> list:
        futures = [self.pool.submit(getattr(stub, method), req, timeout=DEADLINE_S)
                   for stub, req in zip(self.stubs, requests)]
        return [f.result() for f in futures]

    def describe(self) -> Deployment:
        return Deployment.of(self.all("Describe", [pb.MpcDescribeRequest()] * len(self.stubs)))

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        for c in self.channels:
            c.close()


def describe(targets: list[str], *, tls: TlsFiles, server_name: str | None = None,
             connect_timeout: float = 60.0) -> Deployment:
    """What the compute parties serve (they must agree)."""
    parties = _Parties(targets, tls, CostMeter("describe"), server_name, connect_timeout)
    try:
        return parties.describe()
    finally:
        parties.close()


def upload_model(targets: list[str], *, tls: TlsFiles, model, meter: CostMeter | None = None,
                 server_name: str | None = None, connect_timeout: float = 60.0) -> str:
    """The owner: secret-share ``model``'s weights over the compute parties; returns the model id they serve."""
    meter = meter or CostMeter("owner")
    parties = _Parties(targets, tls, meter, server_name, connect_timeout)
    try:
        deployment = parties.describe()
        layout = ParamLayout.of(model)
        if layout.size != deployment.param_count:
            raise ValueError(f"the parties serve an architecture of {deployment.param_count} parameters, this model "
                             f"has {layout.size}")
        flat = layout.flatten(dict(parameters_to_arrays(model)))
        shares = split_shares(encode_fixed(flat), len(targets))
        model_id = secrets.token_hex(8)
        parties.all("UploadModel", [pb.ModelShare(
            model_id=model_id, party=s.party, length=s.length, seed=s.seed or b"",
            dense=to_wire(s.dense, 64) if s.dense is not None else b"") for s in shares])
        log.info("model %s: %d parameters shared over %d compute parties", model_id, layout.size, len(targets))
        return model_id
    finally:
        parties.close()


@dataclass
class Timings:
    """Client-side times (seconds) per query: share, call every party and wait, reconstruct."""

    queries: int = 0
    inputs: int = 0
    share_s: float = 0.0
    rpc_s: float = 0.0
    mpc_s: float = 0.0  # the slowest party's MPC time, as the parties report it
    latencies: list[float] = field(default_factory=list)


class MpcInferenceClient:
    """Queries to a model-private inference deployment: ``infer(x)`` gives logits, or labels in label mode."""

    def __init__(self, targets: list[str], *, tls: TlsFiles, party_id: str, transcript: TranscriptRecorder | None = None,
                 meter: CostMeter | None = None, server_name: str | None = None, connect_timeout: float = 60.0):
        self.party_id = party_id
        self.meter = meter or CostMeter(party_id)
        self.transcript = transcript or TranscriptRecorder(None, party=party_id, role="client")
        self.parties = _Parties(targets, tls, self.meter, server_name, connect_timeout)
        self.deployment = self.parties.describe()
        if not self.deployment.model_id:
            self.parties.close()
            raise ValueError("the compute parties serve no model yet (the owner has not uploaded one)")
        self.timings = Timings()

    @property
    def output(self) -> str:
        return self.deployment.plan.output

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Logits (B, C) float64, or labels (B,) int64 in a label-only deployment, for inputs ``x`` (B, ...)."""
        d = self.deployment
        x = np.asarray(x, np.float32)
        if tuple(x.shape[1:]) != d.input_shape or not 1 <= len(x) <= d.plan.max_batch:
            raise ValueError(f"a query is 1..{d.plan.max_batch} inputs shaped {d.input_shape}, got {x.shape}")
        query_id = secrets.randbits(63)
        t0 = time.perf_counter()
        shares = client_shares(self.party_id, query_id, x.ravel(), d.plan.n_parties)
        t1 = time.perf_counter()
        replies = self.parties.all("Infer", [pb.QueryShare(
            query_id=query_id, party=s.party, num_inputs=len(x), model_id=d.model_id, seed=s.seed or b"",
            dense=to_wire(s.dense, 64) if s.dense is not None else b"") for s in shares])
        t2 = time.perf_counter()
        words = [from_wire(r.share, 64) for r in replies]
        answer = self._reconstruct(replies, words, len(x))
        t3 = time.perf_counter()
        tm = self.timings
        tm.queries, tm.inputs = tm.queries + 1, tm.inputs + len(x)
        tm.share_s += t1 - t0
        tm.rpc_s += t2 - t1
        tm.mpc_s += max(r.mpc_s for r in replies)
        tm.latencies.append(t3 - t0)
        received = {f"share_{i}": w for i, w in enumerate(words)}
        meta = {"mode": "batch", "protocol": "mpc", "num_inputs": len(x), "model_id": d.model_id}
        if self.output == "logits":
            self.transcript.record(Kind.LOGITS, round=0, step=query_id, sender="parties", meta=meta,
                                   tensors={"logits": answer, **received})
        else:
            self.transcript.record(Kind.LABELS, round=0, step=query_id, sender="parties", meta=meta,
                                   tensors={"labels": answer, **received})
        return answer

    def _reconstruct(self, replies: list, words: list[np.ndarray], num_inputs: int) -> np.ndarray:
        d = self.deployment
        want = (num_inputs, d.num_classes) if self.output == "logits" else (num_inputs,)
        for r in replies:
            if r.output != self.output or tuple(r.shape) != want or len(r.share) != 8 * int(np.prod(want)):
                raise ValueError(f"compute party answered {r.output} {tuple(r.shape)}, expected {self.output} {want}")
        if len({r.frac_bits for r in replies}) != 1:
            raise ValueError("the compute parties answered in different fixed points")
        total = reconstruct(words)
        value = total.astype(np.float64) / 2.0 ** replies[0].frac_bits  # not CrypTen's decoder (mpc_model)
        if self.output == "logits":
            return value.reshape(want)
        labels = np.rint(value).astype(np.int64)
        if np.any(labels < 0) or np.any(labels >= d.num_classes) or np.abs(value - labels).max() > 1e-3:
            raise ValueError("the answer shares do not add up to labels (a party answered wrongly)")
        return labels

    def close(self) -> None:
        self.parties.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
