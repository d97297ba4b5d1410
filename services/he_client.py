"""The HE inference client: holds the CKKS secret key, sends only ciphertexts, decrypts the logits.

Its transcript holds what it learned: the decrypted logits of each query
(the view a querying adversary has for membership inference or extraction).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from securecollab.generated.v1 import he_pb2 as pb
from securecollab.generated.v1 import he_pb2_grpc as pb_grpc
from securecollab.he import BatchLayout, InputEncoding, make_context, public_bytes
from securecollab.he.context import modulus_chain
from securecollab.he.batched import decrypt_batch, encrypt_batch_bytes
from securecollab.he.net import decrypt_logits, encrypt_input_bytes, kit_of
from securecollab.he.packing import PackedCiphertext, unpack
from securecollab.net.certs import TlsFiles
from securecollab.net.costs import CostMeter
from securecollab.net.transport import DEFAULT_DEADLINE_S, make_channel, wait_ready
from securecollab.net.wire import decode_tensor, encode_tensor, iter_chunks
from securecollab.transcript import Kind, TranscriptRecorder

log = logging.getLogger(__name__)
# Opening a session uploads tens of MB of keys and encodes the weights.
SESSION_DEADLINE_S = 300.0


@dataclass
class Description:
    model: str
    input_shape: tuple[int, ...]
    num_classes: int
    depth: int
    galois_steps: list[int]
    min_slots: int
    input_encoding: InputEncoding
    max_batch_size: int
    ckks: dict  # poly_modulus_degree, coeff_mod_bit_sizes, scale_bits: what the server plans for

    @classmethod
    def from_reply(cls, m: pb.ModelDescription) -> "Description":
        ckks = {"poly_modulus_degree": m.ckks.poly_modulus_degree,
                "coeff_mod_bit_sizes": list(m.ckks.coeff_mod_bit_sizes), "scale_bits": m.ckks.scale_bits}
        return cls(m.model, tuple(m.input_shape), m.num_classes, m.depth, list(m.galois_steps), m.min_slots,
                   InputEncoding.from_dict(json.loads(m.input_encoding_json)), m.max_batch_size, ckks)

    def make_context(self):
        """A private context with the described parameters (the project's defaults for this depth if the
        server described none)."""
        p = self.ckks
        if not p["poly_modulus_degree"]:
            return make_context(self.depth)
        chain, depth, headroom = p["coeff_mod_bit_sizes"], len(p["coeff_mod_bit_sizes"]) - 2, 0
        if depth >= 1:
            headroom = chain[0] - p["scale_bits"]
        if depth < 1 or headroom < 1 or modulus_chain(depth, p["scale_bits"], headroom) != chain:
            raise ValueError(f"the server describes a modulus chain {chain} (scale 2^{p['scale_bits']}) "
                             "that this client cannot build")
        return make_context(depth, poly_modulus_degree=p["poly_modulus_degree"], scale_bits=p["scale_bits"],
                            headroom_bits=headroom)


@dataclass
class Timings:
    """Client-side stage times (seconds), summed over the queries counted."""

    queries: int = 0
    encrypt_s: float = 0.0
    rpc_s: float = 0.0      # send, evaluate, return
    server_s: float = 0.0   # evaluation alone, as the server reports it
    decrypt_s: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def add(self, encrypt_s, rpc_s, server_s, decrypt_s):
        self.queries += 1
        self.encrypt_s += encrypt_s
        self.rpc_s += rpc_s
        self.server_s += server_s
        self.decrypt_s += decrypt_s
        self.latencies.append(encrypt_s + rpc_s + decrypt_s)


class HEClient:
    """One session with an HE inference server: ``open_session``, then ``infer``/``infer_batch``."""

    def __init__(self, target: str, *, tls: TlsFiles, party_id: str, server_name: str | None = None,
                 transcript: TranscriptRecorder | None = None, meter: CostMeter | None = None,
                 connect_timeout: float = 60.0, packed_results: bool = True):
        self.party_id = party_id
        self.packed_results = packed_results  # single-query results in the compact form (he/packing.py)
        self.meter = meter or CostMeter(party_id)
        self.transcript = transcript or TranscriptRecorder(None, party=party_id, role="client")
        self.channel = make_channel(target, tls=tls, meter=self.meter, server_name=server_name)
        wait_ready(self.channel, timeout=connect_timeout)
        self.stub = pb_grpc.HEInferenceStub(self.channel)
        self.description = Description.from_reply(self.stub.Describe(pb.DescribeRequest(), timeout=DEFAULT_DEADLINE_S))
        self.context = None
        self.session_id: str | None = None
        self.batch_size = 0
        self.session: dict = {}
        self.single = Timings()
        self.batched = Timings()
        self.plain = Timings()
        self._query_ids = itertools.count()

    def open_session(self, batch_size: int = 0) -> dict:
        """Make keys for this model (single queries, plus batches of ``batch_size``) and send the public part."""
        d = self.description
        t0 = time.perf_counter()
        self.context = d.make_context()
        kit = kit_of(self.context)
        if kit.slot_count < d.min_slots:
            raise ValueError(f"the model needs {d.min_slots} slots, the context has {kit.slot_count}")
        steps = set(d.galois_steps)
        if batch_size:
            steps |= set(BatchLayout(batch_size, kit.slot_count).galois_steps())
        blob = public_bytes(self.context, steps)
        keygen_s = time.perf_counter() - t0

        def parts():
            yield pb.SessionPart(options=pb.SessionOptions(batch_size=batch_size))
            for chunk in iter_chunks(blob):
                yield pb.SessionPart(context=chunk)

        t1 = time.perf_counter()
        reply = self.stub.OpenSession(parts(), timeout=SESSION_DEADLINE_S)
        self.session_id, self.batch_size = reply.session_id, batch_size
        self.session = {"keygen_s": keygen_s, "open_s": time.perf_counter() - t1, "server_setup_s": reply.setup_s,
                        "context_bytes": len(blob), "slot_count": reply.slot_count, "batch_size": batch_size,
                        "galois_steps": sorted(steps)}
        log.info("session %s: %.1f MB of public keys, keys made in %.2fs", reply.session_id[:8],
                 len(blob) / 1e6, keygen_s)
        return self.session

    def _require_session(self):
        if self.session_id is None:
            raise RuntimeError("open_session() first")

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Logits of one input, computed by the server on its encryption."""
        self._require_session()
        t0 = time.perf_counter()
        first, *more = encrypt_input_bytes(self.context, x, self.description.input_encoding)
        t1 = time.perf_counter()
        qid = next(self._query_ids)
        reply = self.stub.Infer(pb.InferRequest(session_id=self.session_id, query_id=qid, ciphertext=first,
                                                more_ciphertexts=more,
                                                result_format=pb.PACKED_COEFFICIENTS if self.packed_results
                                                else pb.SEAL_CIPHERTEXT), timeout=DEFAULT_DEADLINE_S)
        t2 = time.perf_counter()
        logits = decrypt_logits(self.context, self._result(reply), self.description.num_classes)
        self.single.add(t1 - t0, t2 - t1, reply.server_s, time.perf_counter() - t2)
        self.transcript.record(Kind.LOGITS, round=0, step=qid, sender="he-server", meta={"mode": "single"},
                               tensors={"logits": logits})
        return logits

    def _result(self, reply: pb.InferReply):
        kit = kit_of(self.context)
        if not self.packed_results:
            return kit.ciphertext_from_bytes(reply.ciphertext)
        p = reply.packed
        return unpack(kit, PackedCiphertext(p.modulus, p.scale, p.degree, tuple(p.dropped_bits),
                                            tuple(p.value_bits), p.values))

    def infer_batch(self, x: np.ndarray) -> np.ndarray:
        """Logits of many inputs, ``batch_size`` per request, packed across slots."""
        self._require_session()
        if not self.batch_size:
            raise RuntimeError("open the session with a batch size for batched queries")
        out = []
        for start in range(0, len(x), self.batch_size):
            chunk = x[start:start + self.batch_size]
            t0 = time.perf_counter()
            cts = encrypt_batch_bytes(self.context, chunk, self.batch_size)
            t1 = time.perf_counter()
            qid = next(self._query_ids)
            parts = (pb.BatchPart(session_id=self.session_id, query_id=qid, num_inputs=len(chunk), index=i,
                                  count=len(cts), ciphertext=c) for i, c in enumerate(cts))
            reply = self.stub.InferBatch(parts, timeout=SESSION_DEADLINE_S)
            t2 = time.perf_counter()
            kit = kit_of(self.context)
            logits = decrypt_batch(self.context, [kit.ciphertext_from_bytes(c) for c in reply.ciphertexts],
                                   len(chunk), self.description.num_classes, self.batch_size)
            self.batched.add(t1 - t0, t2 - t1, reply.server_s, time.perf_counter() - t2)
            self.transcript.record(Kind.LOGITS, round=0, step=qid, sender="he-server",
                                   meta={"mode": "batch", "num_inputs": len(chunk)}, tensors={"logits": logits})
            out.append(logits)
        return np.concatenate(out)

    def predict_plain(self, x: np.ndarray) -> np.ndarray:
        """The plain baseline: the server sees the inputs."""
        t0 = time.perf_counter()
        reply = self.stub.PredictPlain(pb.PlainRequest(inputs=encode_tensor(np.asarray(x, dtype=np.float32))),
                                       timeout=DEFAULT_DEADLINE_S)
        logits = decode_tensor(reply.logits, expect_dtype=np.float32)
        self.plain.add(0.0, time.perf_counter() - t0, reply.server_s, 0.0)
        self.transcript.record(Kind.PLAIN_LOGITS, round=0, sender="he-server", tensors={"logits": logits})
        return logits

    def close(self) -> None:
        try:
            if self.session_id is not None:
                self.stub.CloseSession(pb.CloseRequest(session_id=self.session_id), timeout=DEFAULT_DEADLINE_S)
        except grpc.RpcError as e:  # e.g. the server already evicted it: nothing left to close
            log.info("closing session: %s", e.code().name)
        finally:
            self.session_id = None
            self.channel.close()

    def __enter__(self) -> "HEClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
