"""A model-private inference compute party: holds a share of the owner's model and of each query, evaluates the
model in MPC with the other parties (CrypTen over mutual TLS, the dealer's correlations) and answers each
client with its share of the output alone.

Its transcript (an honest-but-curious party's view) holds what it received from outside the MPC: its share of
the model, from the owner, and its share of each query, from a client (dense, or the seed)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np

from securecollab.errors import ProtocolError
from securecollab.generated.v1 import mpc_inference_pb2 as pb
from securecollab.generated.v1 import mpc_inference_pb2_grpc as pb_grpc
from securecollab.net.certs import TlsFiles
from securecollab.net.costs import CostMeter
from securecollab.net.transport import make_server, peer_identity
from securecollab.plans import MpcInferencePlan
from securecollab.protocols.mpc_inference import QUERY_WAIT_S, ModelShares, Query, QueryBook, serve_queries
from securecollab.secagg.mpc import mpc_stats, setup_party_grpc
from securecollab.secagg.mpc_model import FRAC_BITS, ParamLayout, answer, check_supported, shared_weights
from securecollab.secagg.mpc_net import MpcError, start_endpoint
from securecollab.secagg.sharing import SEED_BYTES, from_wire, prg_int64, to_wire
from securecollab.transcript import Kind, TranscriptRecorder
from services.common import require_role, rpc_errors, write_port_file

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["MpcInference"].full_name
EXIT_REJOIN = 75  # as a secure-aggregation party: "start me again" (a new MPC world)
EXIT_CONFIG = 78  # EX_CONFIG: the parties were given different plans; starting again would not help


def _share_words(seed: bytes, dense: bytes, length: int, what: str) -> tuple[np.ndarray, dict]:
    """A share from the wire (a seed or dense int64 words) and how the transcript records it."""
    if bool(seed) == bool(dense):
        raise ProtocolError("INVALID_ARGUMENT", f"a {what} share is a seed or dense words, exactly one")
    if seed:
        if len(seed) != SEED_BYTES:
            raise ProtocolError("INVALID_ARGUMENT", f"a seed is {SEED_BYTES} bytes, got {len(seed)}")
        return prg_int64(bytes(seed), length), {"blobs": {"seed": bytes(seed)}}
    if len(dense) != 8 * length:
        raise ProtocolError("INVALID_ARGUMENT", f"a {what} share of {length} words is {8 * length} bytes, "
                                                f"got {len(dense)}")
    words = from_wire(dense, 64)
    return words, {"tensors": {"share": words}}


class MpcInferenceServicer(pb_grpc.MpcInferenceServicer):
    def __init__(self, plan: MpcInferencePlan, index: int, input_shape, num_classes: int, layout: ParamLayout,
                 transcript: TranscriptRecorder):
        self.plan, self.index = plan, index
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        self.per_input = int(np.prod(self.input_shape))
        self.models = ModelShares(layout.size)
        self.book = QueryBook()
        self.transcript = transcript
        self.on_model = lambda model_id, share: None  # set by serve(): keep the share across a restart

    @rpc_errors
    def Describe(self, request, context):
        role = peer_identity(context).role
        if role not in ("owner", "client"):
            raise ProtocolError("PERMISSION_DENIED", f"a certificate of role {role!r} has nothing to ask here")
        return pb.MpcModelDescription(
            plan_json=self.plan.public_json(), party=self.index, input_shape=self.input_shape,
            num_classes=self.num_classes, output=self.plan.output, param_count=self.models.param_count,
            model_id=self.models.model_id, max_batch=self.plan.max_batch)

    @rpc_errors
    def UploadModel(self, request, context):
        owner = require_role(context, "owner")
        self._check_party(request.party)
        if request.length != self.models.param_count:
            raise ProtocolError("INVALID_ARGUMENT", f"the model has {self.models.param_count} parameters, the share "
                                                    f"says {request.length}")
        share, record = _share_words(request.seed, request.dense, request.length, "model")
        self.models.put(request.model_id, share)
        self.on_model(request.model_id, share)
        self.transcript.record(Kind.SHARE, round=0, sender=owner.party_id,
                               meta={"what": "model", "model_id": request.model_id, "length": request.length},
                               **record)
        log.info("party %d: holds a share of model %s from %s", self.index, request.model_id, owner.party_id)
        return pb.ModelShareAck(model_id=request.model_id, length=request.length)

    @rpc_errors
    def Infer(self, request, context):
        client = require_role(context, "client").party_id
        self._check_party(request.party)
        if not 1 <= request.num_inputs <= self.plan.max_batch:
            raise ProtocolError("INVALID_ARGUMENT", f"a query holds 1..{self.plan.max_batch} inputs, "
                                                    f"got {request.num_inputs}")
        if self.models.get(request.model_id) is None:
            served = self.models.model_id
            raise ProtocolError("FAILED_PRECONDITION", f"model {request.model_id!r} is not served here (now: "
                                f"{served or 'none, the owner has not uploaded one'})")
        length = request.num_inputs * self.per_input
        share, record = _share_words(request.seed, request.dense, length, "query")
        q = Query(client, request.query_id, request.num_inputs, request.model_id, share)
        self.book.add(q)  # a replayed query id is refused here, before it is recorded
        self.transcript.record(Kind.SHARE, round=0, step=request.query_id, sender=client,
                               meta={"what": "query", "num_inputs": request.num_inputs,
                                     "model_id": request.model_id}, **record)
        if not q.started.wait(QUERY_WAIT_S) and self.book.forget(q):  # once taken into the MPC, it runs to the end
            raise ProtocolError("DEADLINE_EXCEEDED", f"query {request.query_id} was not taken up within "
                                                     f"{QUERY_WAIT_S:.0f}s (did every party get its share?)")
        words, mpc_s = q.result.result()
        shape = (request.num_inputs, self.num_classes) if self.plan.output == "logits" else (request.num_inputs,)
        return pb.AnswerShare(query_id=request.query_id, output=self.plan.output, shape=shape, frac_bits=FRAC_BITS,
                              share=to_wire(words, 64), mpc_s=mpc_s)

    def _check_party(self, party: int) -> None:
        if party != self.index:
            raise ProtocolError("INVALID_ARGUMENT", f"this is compute party {self.index}, the share is for {party}")


STATE_FILE = "model_share.npz"


def _load_state(state_dir: Path | None, models: ModelShares) -> None:
    """The model share this party held before a restart (its own disk: as sensitive as its memory)."""
    path = state_dir / STATE_FILE if state_dir else None
    if path and path.exists():
        with np.load(path, allow_pickle=False) as f:
            models.put(str(f["model_id"]), f["share"].astype(np.int64))
        log.info("holds model %s again (from %s)", models.model_id, path)


def _save_state(state_dir: Path | None, model_id: str, share: np.ndarray) -> None:
    if not state_dir:
        return
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{STATE_FILE}"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        np.savez(f, model_id=np.array(model_id), share=share)
    os.replace(tmp, state_dir / STATE_FILE)


def _check_same_plan(comm, plan: MpcInferencePlan, layout: ParamLayout) -> None:
    """Every party must run the same operations: refuse to serve unless all hold the same plan and layout."""
    import torch
    digest = hashlib.sha256(f"{plan.to_json()}|{layout.entries}".encode()).digest()
    mine = torch.from_numpy(np.frombuffer(digest, "<i8").copy())
    if any(not torch.equal(mine, theirs) for theirs in comm.all_gather(mine)):
        raise ValueError("the compute parties were given different plans (architecture, output or data set); "
                         "start every party with the same one")


def serve(plan: MpcInferencePlan, index: int, *, tls: TlsFiles, mpc_peers: list[str], dealer: str,
          mpc_host: str | None = None, port: int = 0, host: str = "[::]", out_dir: Path | None = None,
          port_file: Path | None = None, state_dir: Path | None = None) -> None:
    """Run inference party ``index`` until SIGTERM: join the MPC world, serve, run queries on this thread.

    With ``state_dir`` the model share is kept there (mode 0600) and read back when the party starts again."""
    import torch
    torch.set_num_threads(1)  # several parties share the machine's cores
    if len(mpc_peers or []) != plan.n_parties:
        raise ValueError(f"give the MPC endpoint of each of the {plan.n_parties} compute parties, in index order")
    if not dealer:
        raise ValueError("model-private inference needs a dealer of correlations: give its address")
    party_id = f"party-{index}"
    meter = CostMeter(party_id)
    ds = plan.load_data()
    model = plan.build_model(ds).eval()  # the public architecture; its weights are never used
    check_supported(model)  # before any MPC: an unsupported layer would break the world on the first query
    layout = ParamLayout.of(model)
    transcript = TranscriptRecorder(out_dir / "transcripts" / f"{party_id}.jsonl" if out_dir else None,
                                    party=party_id, role="party", resume=True)
    transcript.record(Kind.PLAN, round=0, sender=party_id, meta=json.loads(plan.to_json()))
    servicer = MpcInferenceServicer(plan, index, ds.input_shape, ds.num_classes, layout, transcript)
    _load_state(state_dir, servicer.models)
    servicer.on_model = lambda model_id, share: _save_state(state_dir, model_id, share)
    server = None

    def write_costs():
        if out_dir:
            meter.write(out_dir / f"costs_{party_id}.json")
            (out_dir / f"mpc_stats_{party_id}.json").write_text(json.dumps(mpc_stats()))

    def leave(code: int):
        servicer.book.fail_all("UNAVAILABLE", f"compute party {index} is leaving its MPC world")
        try:
            if server is not None:  # a signal while the world forms: nothing served yet
                server.set_serving(False)
                server.stop(grace=1.0)
                write_costs()
        finally:
            os._exit(code)  # crash-only: a broken MPC world would hang a normal interpreter exit

    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=leave, args=(0,), daemon=True).start())
    signal.signal(signal.SIGINT, lambda *_: threading.Thread(target=leave, args=(0,), daemon=True).start())
    mpc_port = int(mpc_peers[index].rsplit(":", 1)[1])
    endpoint, peer = start_endpoint(index, plan.n_parties, True, tls, port=mpc_port, host=mpc_host or host,
                                    meter=meter)
    try:  # the world first: a party that cannot reach its peers and the dealer must not take shares
        crypten = setup_party_grpc(peer, mpc_peers, tls, dealer_target=dealer, meter=meter)
        _check_same_plan(crypten.communicator.get(), plan, layout)
    except MpcError as e:
        log.error("inference party %d could not form its MPC world: %s; exiting to be started again", index, e)
        os._exit(EXIT_REJOIN)
    except ValueError as e:
        log.error("inference party %d: %s", index, e)
        os._exit(EXIT_CONFIG)
    server = make_server(tls=tls, port=port, host=host, meter=meter)
    server.add(pb_grpc.add_MpcInferenceServicer_to_server, servicer, SERVICE)
    server.start()
    write_port_file(port_file, server.port)
    log.info("inference party %d of %d on port %d (%s, output %s)", index, plan.n_parties, server.port, plan.model,
             plan.output)
    built: dict[int, dict] = {}  # the MPCTensors of the model share held now, built once per upload

    def run(q: Query, model_share: np.ndarray) -> np.ndarray:
        key = id(model_share)
        if key not in built:
            built.clear()
            built[key] = (model_share, shared_weights(layout, model_share))  # keeps the array (and its id) alive
        t0 = time.perf_counter()
        words = answer(model, built[key][1], q.share, ds.input_shape, plan.output)
        log.info("query %d of %s: %d input(s) in %.2fs", q.query_id, q.client, q.num_inputs, time.perf_counter() - t0)
        return words

    try:
        comm = crypten.communicator.get()
        serve_queries(comm, index, servicer.book, servicer.models, run, threading.Event(), on_done=write_costs,
                      broken=lambda: comm.world.inbox.broken)
    except MpcError as e:
        log.error("inference party %d: the MPC world broke (%s); exiting to be started again", index, e)
        leave(EXIT_REJOIN)
    except Exception:
        log.exception("inference party %d: MPC failed; exiting to be started again", index)
        leave(EXIT_REJOIN)
