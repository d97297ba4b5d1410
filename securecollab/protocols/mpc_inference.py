"""Model-private inference, a compute party's state machine: the model share it holds, the queries waiting,
and the loop that runs them in the same order on every party.

Every party must run the same CrypTen operations in the same order. Party 0 orders the queries: it
broadcasts each query's header over the MPC world; the others find their share of the same query and all
say (an all_gather of one bit each, not secret) whether they hold it and the model it names. Only if all do
is the query evaluated; otherwise every party refuses it and the world stays in step. While no query
waits, party 0 broadcasts a heartbeat, so the others' wait for the next message never times out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from securecollab.errors import ProtocolError

log = logging.getLogger(__name__)

HEARTBEAT_S = 20.0    # party 0's idle message: far below the MPC world's 120 s step timeout
ARRIVAL_S = 10.0      # how long a party waits for its share of a query party 0 already holds
QUERY_WAIT_S = 120.0  # a query not run by then is answered DEADLINE_EXCEEDED
SEEN_PER_CLIENT = 1 << 16  # query ids remembered per client, to refuse replays
PENDING_PER_CLIENT = 8     # queries one client may have waiting: one client cannot take every server thread


@dataclass
class Query:
    client: str
    query_id: int
    num_inputs: int
    model_id: str
    share: np.ndarray  # this party's share of the inputs, flat int64
    result: Future = field(default_factory=Future)
    started: threading.Event = field(default_factory=threading.Event)  # taken into the MPC

    def header(self) -> dict:
        return {"client": self.client, "query": self.query_id, "n": self.num_inputs, "model": self.model_id}


class ModelShares:
    """The model share this party holds (one at a time: a new upload replaces it), by the owner's model id."""

    def __init__(self, param_count: int):
        self.param_count = param_count
        self._lock = threading.Lock()
        self._held: tuple[str, np.ndarray] | None = None

    def put(self, model_id: str, share: np.ndarray) -> None:
        if not model_id or len(model_id) > 64:
            raise ProtocolError("INVALID_ARGUMENT", "a model id is 1..64 characters")
        if share.dtype != np.int64 or share.shape != (self.param_count,):
            raise ProtocolError("INVALID_ARGUMENT", f"a model share is {self.param_count} int64 words, "
                                                    f"got {share.size} {share.dtype}")
        with self._lock:
            self._held = (model_id, share)

    @property
    def model_id(self) -> str:
        with self._lock:
            return self._held[0] if self._held else ""

    def get(self, model_id: str) -> np.ndarray | None:
        """The share of model ``model_id`` if it is the one held now (read once per query: an upload during a
        query does not change what the query runs on)."""
        with self._lock:
            return self._held[1] if self._held and model_id and self._held[0] == model_id else None


class QueryBook:
    """Queries received and not yet run, by (client, query id); replays refused; FIFO for party 0."""

    def __init__(self):
        self._cond = threading.Condition()
        self._pending: OrderedDict[tuple[str, int], Query] = OrderedDict()
        self._seen: dict[str, deque] = {}
        self._seen_sets: dict[str, set] = {}

    def add(self, q: Query) -> None:
        key = (q.client, q.query_id)
        with self._cond:
            seen = self._seen_sets.setdefault(q.client, set())
            if q.query_id in seen:
                raise ProtocolError("ALREADY_EXISTS", f"query {q.query_id} of {q.client} was already received")
            if sum(1 for c, _ in self._pending if c == q.client) >= PENDING_PER_CLIENT:
                raise ProtocolError("RESOURCE_EXHAUSTED", f"{q.client} has {PENDING_PER_CLIENT} queries waiting "
                                                          "here already; wait for their answers")
            order = self._seen.setdefault(q.client, deque())
            order.append(q.query_id)
            seen.add(q.query_id)
            if len(order) > SEEN_PER_CLIENT:
                seen.discard(order.popleft())
            self._pending[key] = q
            self._cond.notify_all()

    def next_ready(self, timeout_s: float) -> Query | None:
        """Party 0: the oldest waiting query, taken out of the book; None after ``timeout_s``."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._pending, timeout=timeout_s):
                return None
            q = self._pending.popitem(last=False)[1]
            q.started.set()
            return q

    def claim(self, client: str, query_id: int, wait_s: float) -> Query | None:
        """Parties 1..n-1: this party's share of the query party 0 announced (waiting for it to arrive)."""
        key = (client, query_id)
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._pending, timeout=wait_s):
                return None
            q = self._pending.pop(key)
            q.started.set()
            return q

    def forget(self, q: Query) -> bool:
        """Drop a query that waited too long, unless the MPC took it meanwhile (then it runs: False)."""
        with self._cond:
            if q.started.is_set():
                return False
            self._pending.pop((q.client, q.query_id), None)
            return True

    def fail_all(self, code: str, message: str) -> None:
        with self._cond:
            pending, self._pending = list(self._pending.values()), OrderedDict()
        for q in pending:
            if not q.result.done():
                q.result.set_exception(ProtocolError(code, message))


def serve_queries(comm, rank: int, book: QueryBook, models: ModelShares, run, stop: threading.Event,
                  on_done=lambda: None) -> None:
    """Run queries in party 0's order until ``stop`` (the MPC thread's loop; every party runs it).

    ``run(query, model_share)`` evaluates one query in MPC and returns this party's answer share; ``comm`` is the
    MPC world's communicator (broadcast_obj, all_gather). An MpcError (a broken world) propagates."""
    import torch
    while not stop.is_set():
        if rank == 0:
            q = book.next_ready(HEARTBEAT_S)
            header = q.header() if q else {"idle": 1}
            comm.broadcast_obj(header, 0)
        else:
            header = comm.broadcast_obj(None, 0)
            if not isinstance(header, dict):
                raise ProtocolError("INTERNAL", "party 0 sent a malformed query header")
            q = None if "idle" in header else book.claim(str(header["client"]), int(header["query"]), ARRIVAL_S)
        if "idle" in header:
            continue
        model = models.get(str(header["model"]))
        ok = q is not None and model is not None and q.num_inputs == header["n"] and q.model_id == header["model"]
        flags = comm.all_gather(torch.tensor([int(ok)]))
        missing = [i for i, f in enumerate(flags) if not int(f)]
        if missing:
            if q is not None:
                q.result.set_exception(ProtocolError(
                    "ABORTED", f"compute parties {missing} did not hold this query within {ARRIVAL_S:.0f}s of party 0 "
                    "(or serve another model): send every party its share of the same query, and retry with a new "
                    "query id"))
            continue
        t0 = time.perf_counter()
        try:
            share = run(q, model)
        except BaseException as e:
            q.result.set_exception(ProtocolError("UNAVAILABLE", f"the MPC failed ({type(e).__name__}); the compute "
                                                 "parties form a new world: retry with a new query id"))
            raise
        q.result.set_result((share, time.perf_counter() - t0))
        on_done()
