"""HE inference, server side: the model in the clear, one CKKS session per client context.

A session is opened from a client's public context (no secret key: refused
otherwise) and binds the model's weights to it once -- single-query layout
always, the batched layout when the client asked for a batch size -- so each
query pays only for evaluation. Sessions belong to the certificate that
opened them; query ids are single-use per session (replays are refused).
"""

from __future__ import annotations

import contextlib

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from securecollab.errors import ProtocolError
from securecollab.he import HENet, HENetBatched, load_public
from securecollab.he.context import default_parameters
from securecollab.he.packing import PackedCiphertext, pack
from securecollab.training import predict_logits


@dataclass
class Session:
    session_id: str
    owner: str
    context_bytes: int
    net: HENet
    batched: HENetBatched | None
    batch_size: int
    slot_count: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    queries: set[int] = field(default_factory=set)
    last_used: float = field(default_factory=time.monotonic)


IDLE_EVICT_S = 300.0  # another party's session idle this long may be evicted
ARRIVING_CONTEXTS = 4  # contexts of the largest size that may be arriving (or set up) at once


class ByteBudget:
    """Bytes that requests may hold at once: one that would go over waits up to ``wait_s`` for room, then is
    refused (RESOURCE_EXHAUSTED), so concurrent uploads cannot fill the memory."""

    def __init__(self, limit: int, wait_s: float = 120.0):
        self.limit, self.wait_s, self.held = limit, wait_s, 0
        self._room = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int, what: str = "requests"):
        nbytes = min(max(nbytes, 0), self.limit)
        with self._room:
            if not self._room.wait_for(lambda: self.held + nbytes <= self.limit, timeout=self.wait_s):
                raise ProtocolError("RESOURCE_EXHAUSTED", f"too many {what} arriving at once; try again")
            self.held += nbytes
        try:
            yield
        finally:
            with self._room:
                self.held -= nbytes
                self._room.notify_all()


class HEModelHost:
    """The served model and its open sessions (bounded in number; the least recently used goes first)."""

    def __init__(self, model, input_shape: tuple[int, ...], num_classes: int, *, name: str,
                 max_sessions: int = 4, max_batch_size: int = 4096, max_context_bytes: int = 256 << 20):
        self.model = model.eval()
        self.name = name
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = num_classes
        self.net = HENet.from_torch(model, self.input_shape)
        self.batched = HENetBatched.from_torch(model, self.input_shape)
        self.max_sessions = max_sessions
        self.max_batch_size = max_batch_size
        self.max_context_bytes = max_context_bytes
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()
        # A context is held from its first byte (by its declared size) until its session is set up.
        self.arriving = ByteBudget(ARRIVING_CONTEXTS * max_context_bytes)
        self._arriving_from: set[str] = set()  # owners with a context on its way: one each
        # Opening a session holds a context (up to max_context_bytes) and encodes the weights: two at a time.
        self._opening = threading.BoundedSemaphore(2)

    def describe(self) -> dict:
        return {"model": self.name, "input_shape": list(self.input_shape), "num_classes": self.num_classes,
                "depth": self.net.depth, "galois_steps": self.net.galois_steps, "min_slots": self.net.min_slots,
                "input_encoding": self.net.input_encoding.to_dict(), "max_batch_size": self.max_batch_size,
                "max_context_bytes": self.max_context_bytes, "ckks": default_parameters(self.net.depth),
                "input_period": self.net.input_encoding.period,
                "input_ciphertexts": self.net.input_encoding.ciphertexts,
                "input_sources": self.net.input_encoding.slot_sources(),
                "logit_slots": list(range(self.num_classes))}  # decrypt_logits reads the first slots

    # -- sessions -------------------------------------------------------------

    @contextlib.contextmanager
    def arriving_context(self, owner: str, declared_bytes: int):
        """Room for one owner's context of ``declared_bytes`` while it arrives and its session is set up: one at a
        time per owner, all together within ``arriving`` (so a few stalled uploads cannot hold every slot)."""
        if declared_bytes > self.max_context_bytes:
            raise ProtocolError("INVALID_ARGUMENT", f"a context of {declared_bytes} bytes exceeds the limit of "
                                                    f"{self.max_context_bytes}")
        with self._lock:
            if owner in self._arriving_from:
                raise ProtocolError("RESOURCE_EXHAUSTED", f"{owner} is already sending a context")
            self._arriving_from.add(owner)
        try:
            with self.arriving.hold(declared_bytes, "HE contexts"):
                yield
        finally:
            with self._lock:
                self._arriving_from.discard(owner)

    def open_session(self, owner: str, context: bytes, batch_size: int) -> Session:
        if batch_size > self.max_batch_size:
            raise ProtocolError("INVALID_ARGUMENT", f"batch size {batch_size} exceeds this server's "
                                                    f"maximum of {self.max_batch_size}")
        if not self._opening.acquire(timeout=120):
            raise ProtocolError("RESOURCE_EXHAUSTED", "too many sessions are being opened; try again")
        try:
            return self._open(owner, context, batch_size)
        finally:
            self._opening.release()

    def _open(self, owner: str, context: bytes, batch_size: int) -> Session:
        try:
            public = load_public(context)
        except (ValueError, RuntimeError) as e:
            raise ProtocolError("INVALID_ARGUMENT", f"unusable HE context: {e}") from None
        slots = public.kit.slot_count
        if slots < self.net.min_slots:
            raise ProtocolError("INVALID_ARGUMENT", f"the context has {slots} slots; the model needs "
                                                    f"{self.net.min_slots}")
        if batch_size > slots:
            raise ProtocolError("INVALID_ARGUMENT", f"batch size {batch_size} exceeds the {slots} slots")
        try:
            net = HENet(self.net.layers, self.net.first_conv).bind(public)
            batched = HENetBatched(self.batched.layers).bind(public, batch_size) if batch_size else None
        except ValueError as e:  # too little depth, missing Galois keys, ...
            raise ProtocolError("INVALID_ARGUMENT", f"the context does not fit this model: {e}") from None
        session = Session(secrets.token_hex(16), owner, len(context), net, batched, batch_size, slots)
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                # Make room from the caller's own sessions first, then from sessions idle for long;
                # one party must not be able to close everyone else's.
                own = [sid for sid, s in self._sessions.items() if s.owner == owner]
                idle = [sid for sid, s in self._sessions.items() if time.monotonic() - s.last_used > IDLE_EVICT_S]
                victims = own or idle
                if not victims:
                    raise ProtocolError("RESOURCE_EXHAUSTED", f"all {self.max_sessions} session slots are in use; "
                                                              "close one or try later")
                del self._sessions[victims[0]]  # the least recently used of them
            self._sessions[session.session_id] = session
        return session

    def session(self, session_id: str, owner: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise ProtocolError("NOT_FOUND", f"no open session {session_id!r} (closed or evicted: open a new one)")
            if session.owner != owner:
                raise ProtocolError("PERMISSION_DENIED", f"session {session_id!r} belongs to another party")
            self._sessions.move_to_end(session_id)
            session.last_used = time.monotonic()
            return session

    def close_session(self, session_id: str, owner: str) -> None:
        self.session(session_id, owner)
        with self._lock:
            self._sessions.pop(session_id, None)

    @property
    def open_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    # -- queries --------------------------------------------------------------

    @staticmethod
    def _claim(session: Session, query_id: int) -> None:
        if query_id in session.queries:
            raise ProtocolError("ALREADY_EXISTS", f"query {query_id} was already answered in this session (replay)")
        session.queries.add(query_id)

    def infer(self, session: Session, query_id: int, ciphertexts: list[bytes], *, packed: bool = False
              ) -> bytes | PackedCiphertext:
        """The encrypted logits of one input (its ciphertexts): SEAL's serialization, or the compact form
        (he/packing.py) if ``packed``."""
        expected = session.net.input_encoding.ciphertexts
        if len(ciphertexts) != expected:
            raise ProtocolError("INVALID_ARGUMENT", f"an input takes {expected} ciphertext(s) with this model, "
                                                    f"got {len(ciphertexts)}")
        with session.lock:
            self._claim(session, query_id)
            try:
                result = session.net.evaluate([session.net.kit.load_fresh(c) for c in ciphertexts])
                return pack(session.net.kit, result) if packed else session.net.kit.ciphertext_bytes(result)
            except (ValueError, RuntimeError) as e:  # SEAL refusing a crafted ciphertext mid-evaluation
                session.queries.discard(query_id)
                raise ProtocolError("INVALID_ARGUMENT", f"cannot evaluate this ciphertext: {e}") from None

    @staticmethod
    def batch_ciphertexts(session: Session) -> int:
        """How many input ciphertexts one batch takes in this session."""
        if session.batched is None:
            raise ProtocolError("FAILED_PRECONDITION", "this session has no batched layout: open it with a batch size")
        return session.batched.layout.n_ciphertexts(session.batched.in_features)

    def infer_batch(self, session: Session, query_id: int, ciphertexts: list[bytes]) -> list[bytes]:
        expected = self.batch_ciphertexts(session)
        if len(ciphertexts) != expected:
            raise ProtocolError("INVALID_ARGUMENT", f"a batch takes {expected} ciphertexts in this session, "
                                                    f"got {len(ciphertexts)}")
        with session.lock:
            self._claim(session, query_id)
            try:
                cts = [session.batched.kit.load_fresh(c) for c in ciphertexts]
                return [session.batched.kit.ciphertext_bytes(ct) for ct in session.batched.evaluate(cts)]
            except (ValueError, RuntimeError) as e:
                session.queries.discard(query_id)
                raise ProtocolError("INVALID_ARGUMENT", f"cannot evaluate these ciphertexts: {e}") from None

    def predict_plain(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 1 + len(self.input_shape) or tuple(x.shape[1:]) != self.input_shape:
            raise ProtocolError("INVALID_ARGUMENT", f"inputs must be shaped (n, {', '.join(map(str, self.input_shape))}), "
                                                    f"got {x.shape}")
        most = max(1, self.max_batch_size)  # batched mode off (0) still answers one input at a time
        if not 1 <= len(x) <= most:
            raise ProtocolError("INVALID_ARGUMENT", f"1..{most} inputs per request, got {len(x)}")
        logits = predict_logits(self.model, x).astype(np.float32)
        if not np.isfinite(logits).all():
            raise ProtocolError("INVALID_ARGUMENT", "these inputs overflow the model (non-finite logits)")
        return logits
