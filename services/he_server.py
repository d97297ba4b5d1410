"""The HE inference service: evaluates its model on CKKS ciphertexts; never holds a secret key.

Its transcript (the adversary's view of an honest-but-curious server) holds
each session's public context and every ciphertext it received; the plain
baseline method records the inputs it saw in the clear.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from pathlib import Path

import numpy as np

from securecollab.errors import ProtocolError
from securecollab.generated.v1 import he_pb2 as pb
from securecollab.generated.v1 import he_pb2_grpc as pb_grpc
from securecollab.net.certs import TlsFiles
from securecollab.net.costs import CostMeter
from securecollab.net.transport import make_server, peer_identity
from securecollab.net.wire import assemble_chunks, decode_tensor, encode_tensor
from securecollab.protocols.he import HEModelHost
from securecollab.transcript import Kind, TranscriptRecorder
from services.common import rpc_errors, write_port_file

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["HEInference"].full_name
MAX_CIPHERTEXT_BYTES = 8 << 20


def _client(context) -> str:
    """The caller's party id; only clients (certificate role "client") may use the model."""
    identity = peer_identity(context)
    if identity.role != "client":
        raise ProtocolError("PERMISSION_DENIED", f"a certificate of role {identity.role!r} cannot use the model "
                                                 "(only clients can)")
    return identity.party_id


class HEInferenceServicer(pb_grpc.HEInferenceServicer):
    def __init__(self, host: HEModelHost, transcript: TranscriptRecorder):
        self.host = host
        self.transcript = transcript

    @rpc_errors
    def Describe(self, request, context):
        _client(context)
        d = self.host.describe()
        return pb.ModelDescription(
            model=d["model"], input_shape=d["input_shape"], num_classes=d["num_classes"], depth=d["depth"],
            galois_steps=d["galois_steps"], min_slots=d["min_slots"],
            input_encoding_json=json.dumps(d["input_encoding"]), max_batch_size=d["max_batch_size"],
            max_context_bytes=d["max_context_bytes"], ckks=pb.CkksParameters(**d["ckks"]),
            input_layout=pb.SlotLayout(period=d["input_period"], source=d["input_sources"],
                                       ciphertexts=d["input_ciphertexts"]),
            logit_slots=d["logit_slots"])

    @rpc_errors
    def OpenSession(self, request_iterator, context):
        owner = _client(context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "options":
            raise ProtocolError("INVALID_ARGUMENT", "a session stream starts with its options")
        batch_size = first.options.batch_size

        def chunks():
            for part in request_iterator:
                if part.WhichOneof("part") != "context":
                    raise ProtocolError("INVALID_ARGUMENT", "options may be sent only once, first")
                yield part.context

        stream = chunks()
        head = next(stream, None)
        if head is None:
            raise ProtocolError("INVALID_ARGUMENT", "the session stream holds no context")
        # Room for the context before it is read: many clients uploading at once must not fill the memory.
        with self.host.arriving_context(owner, head.total_bytes):
            _, blob = assemble_chunks(itertools.chain([head], stream), max_bytes=self.host.max_context_bytes)
            t0 = time.perf_counter()
            session = self.host.open_session(owner, blob, batch_size)
            setup_s = time.perf_counter() - t0
        self.transcript.record(Kind.CONTEXT, round=0, sender=owner,
                               meta={"session": session.session_id, "batch_size": batch_size,
                                     "sha256": hashlib.sha256(blob).hexdigest()},
                               blobs={"public_context": blob})
        log.info("session %s for %s: %.1f MB context, batch size %d, set up in %.2fs",
                 session.session_id[:8], owner, len(blob) / 1e6, batch_size, setup_s)
        return pb.SessionReply(session_id=session.session_id, context_bytes=len(blob),
                               slot_count=session.slot_count, setup_s=setup_s)

    @rpc_errors
    def Infer(self, request, context):
        owner = _client(context)
        session = self.host.session(request.session_id, owner)
        ciphertexts = [request.ciphertext, *request.more_ciphertexts]
        if any(len(c) > MAX_CIPHERTEXT_BYTES for c in ciphertexts):
            raise ProtocolError("INVALID_ARGUMENT", "ciphertext too large")
        if request.result_format not in (pb.SEAL_CIPHERTEXT, pb.PACKED_COEFFICIENTS):
            raise ProtocolError("INVALID_ARGUMENT", f"unknown result format {request.result_format}")
        packed = request.result_format == pb.PACKED_COEFFICIENTS
        t0 = time.perf_counter()
        out = self.host.infer(session, request.query_id, ciphertexts, packed=packed)
        server_s = time.perf_counter() - t0
        self.transcript.record(Kind.QUERY, round=0, step=request.query_id, sender=owner,
                               meta={"session": session.session_id},
                               blobs={"ciphertext": request.ciphertext,
                                      **{f"ciphertext_{i}": c for i, c in enumerate(request.more_ciphertexts, 1)}})
        if packed:
            return pb.InferReply(query_id=request.query_id, server_s=server_s, packed=pb.PackedCiphertext(
                modulus=out.modulus, scale=out.scale, degree=out.degree, dropped_bits=out.dropped_bits,
                value_bits=out.value_bits, values=out.values))
        return pb.InferReply(query_id=request.query_id, ciphertext=out, server_s=server_s)

    @rpc_errors
    def InferBatch(self, request_iterator, context):
        owner = _client(context)
        head = next(request_iterator, None)
        if head is None:
            raise ProtocolError("INVALID_ARGUMENT", "empty batch")
        # Who and how many first: nothing is buffered for a session the caller does not own.
        session = self.host.session(head.session_id, owner)
        expected = self.host.batch_ciphertexts(session)
        parts = []
        for part in itertools.chain([head], request_iterator):
            if len(part.ciphertext) > MAX_CIPHERTEXT_BYTES:
                raise ProtocolError("INVALID_ARGUMENT", "ciphertext too large")
            parts.append(part)
            if len(parts) > expected:
                raise ProtocolError("INVALID_ARGUMENT", f"a batch takes {expected} ciphertexts in this session")
        if head.count != len(parts) or [p.index for p in parts] != list(range(len(parts))):
            raise ProtocolError("INVALID_ARGUMENT", f"batch parts must be numbered 0..{head.count - 1} in order, "
                                                    f"got {len(parts)} parts")
        for p in parts:
            if (p.session_id, p.query_id, p.num_inputs, p.count) != (head.session_id, head.query_id,
                                                                     head.num_inputs, head.count):
                raise ProtocolError("INVALID_ARGUMENT", "batch parts disagree on session, query, inputs or count")
        if not 1 <= head.num_inputs <= session.batch_size:
            raise ProtocolError("INVALID_ARGUMENT", f"a batch holds 1..{session.batch_size} inputs in this session, "
                                                    f"got {head.num_inputs}")
        t0 = time.perf_counter()
        out = self.host.infer_batch(session, head.query_id, [p.ciphertext for p in parts])
        server_s = time.perf_counter() - t0
        self.transcript.record(Kind.BATCH, round=0, step=head.query_id, sender=owner,
                               meta={"session": session.session_id, "num_inputs": head.num_inputs},
                               blobs={f"ciphertext_{p.index}": p.ciphertext for p in parts})
        return pb.BatchReply(query_id=head.query_id, ciphertexts=out, server_s=server_s)

    @rpc_errors
    def CloseSession(self, request, context):
        self.host.close_session(request.session_id, _client(context))
        return pb.CloseReply()

    @rpc_errors
    def PredictPlain(self, request, context):
        owner = _client(context)
        x = decode_tensor(request.inputs, expect_dtype=np.float32, finite=True)
        t0 = time.perf_counter()
        logits = self.host.predict_plain(x)
        server_s = time.perf_counter() - t0
        self.transcript.record(Kind.PLAIN_QUERY, round=0, sender=owner, tensors={"inputs": x})
        return pb.PlainReply(logits=encode_tensor(logits), server_s=server_s)


def serve(host_model: HEModelHost, *, tls: TlsFiles, port: int = 0, host: str = "[::]",
          out_dir: Path | None = None, port_file: Path | None = None, block: bool = True):
    """Serve until SIGTERM (block=True), or return (server, meter) once started."""
    meter = CostMeter("he-server")
    transcript = TranscriptRecorder(out_dir / "transcripts" / "he-server.jsonl" if out_dir else None,
                                    party="he-server", role="he")
    server = make_server(tls=tls, port=port, host=host, meter=meter)
    server.add(pb_grpc.add_HEInferenceServicer_to_server, HEInferenceServicer(host_model, transcript), SERVICE)
    server.start()
    write_port_file(port_file, server.port)
    log.info("HE inference (%s, depth %d) on port %d", host_model.name, host_model.net.depth, server.port)
    if not block:
        return server, meter
    server.serve_until_signal()
    if out_dir:
        meter.write(out_dir / "costs_he-server.json")
    return server, meter
