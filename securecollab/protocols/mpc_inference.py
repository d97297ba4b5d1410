"""Model-private inference, a compute party's state machine: the model share it holds, the queries waiting,
and the loop that runs them in the same order on every party.

Every party must run the same CrypTen operations in the same order. Party 0 orders the queries: it
broadcasts the headers of the oldest queries it holds (up to ``OFFERED``) over the MPC world, every party
says for each (an all_gather, not secret) whether it holds its share of it and the model it names, and all
run, in party 0's order, those that every party holds. A query that some party still lacks does not hold up
those behind it: it is offered again until ``ARRIVAL_S`` after it was first offered, then refused by all.
While no query waits, party 0 broadcasts a heartbeat, so the others' wait for the next message never times
out; meanwhile it looks at its MPC world every ``WORLD_CHECK_S``, so a world broken by a peer's restart is left
at once (the others notice in their wait for party 0's message).
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
from securecollab.secagg.mpc_net import MpcError

log = logging.getLogger(__name__)

HEARTBEAT_S = 20.0    # party 0's idle message: far below the MPC world's 120 s step timeout
ARRIVAL_S = 10.0      # how long a query party 0 holds is offered while some party still lacks its share
OFFERED = 64          # queries party 0 offers at once (the oldest; a client has at most 8 waiting)
WORLD_CHECK_S = 1.0   # how often idle party 0 looks whether its MPC world broke (a peer restarted)
POLL_S = 0.05         # party 0's longest pause before offering again queries that some party still lacks
FIRST_POLL_S = 0.002  # its first pause (doubled at each offer that runs nothing): a share is usually a moment late
NOT_HELD, HELD, MISMATCH = 0, 1, 2  # what a party says of an offered query: it lacks it, holds it, holds it but
#                                     for another model or input count than party 0's
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

    @property
    def key(self) -> tuple[str, int]:
        return self.client, self.query_id

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
        self._added = 0

    def add(self, q: Query) -> None:
        key = q.key
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
            self._added += 1
            self._cond.notify_all()

    def oldest(self, limit: int, timeout_s: float, seen: int = -1) -> tuple[list[Query], int]:
        """Party 0: the oldest ``limit`` queries waiting, left in the book, and the count of queries added so
        far. Waits up to ``timeout_s`` for one, or, given the count ``seen`` of an earlier call, for one more."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending and self._added != seen, timeout=timeout_s)
            return list(self._pending.values())[:limit], self._added

    def find(self, client: str, query_id: int) -> Query | None:
        with self._cond:
            return self._pending.get((client, query_id))

    def take(self, client: str, query_id: int) -> Query | None:
        """The query, taken out of the book into the MPC (None if it is not here, or not any more)."""
        with self._cond:
            q = self._pending.pop((client, query_id), None)
            if q is not None:
                q.started.set()
            return q

    def forget(self, q: Query) -> bool:
        """Drop a query that waited too long, unless the MPC took it meanwhile (then it runs: False)."""
        with self._cond:
            if q.started.is_set():
                return False
            self._pending.pop(q.key, None)
            return True

    def fail_all(self, code: str, message: str) -> None:
        with self._cond:
            pending, self._pending = list(self._pending.values()), OrderedDict()
        for q in pending:
            if not q.result.done():
                q.result.set_exception(ProtocolError(code, message))


def serve_queries(comm, rank: int, book: QueryBook, models: ModelShares, run, stop: threading.Event,
                  on_done=lambda: None, broken=lambda: None) -> None:
    """Run queries in party 0's order until ``stop`` (the MPC thread's loop; every party runs it).

    ``run(query, model_share)`` evaluates one query in MPC and returns this party's answer share; ``comm`` is the
    MPC world's communicator (broadcast_obj, all_gather); ``broken()``: why the world is broken, or None. An
    MpcError (a broken world) propagates."""
    import torch
    first_offered: dict[tuple[str, int], float] = {}  # party 0: when each waiting query was first offered
    seen, pause = -1, FIRST_POLL_S
    while not stop.is_set():
        if rank == 0:
            waiting, added = _wait_for_queries(book, HEARTBEAT_S if seen < 0 else pause, seen, broken)
            now = time.monotonic()
            first_offered = {q.key: first_offered.get(q.key, now) for q in waiting}
            offer = {"queries": [{**q.header(), "late": int(now - first_offered[q.key] > ARRIVAL_S)}
                                 for q in waiting]} if waiting else {"idle": 1}
            comm.broadcast_obj(offer, 0)
        else:
            offer = _checked_offer(comm.broadcast_obj(None, 0))
        if "idle" in offer:
            seen, pause = -1, FIRST_POLL_S
            continue
        headers = offer["queries"]
        gathered = comm.all_gather(torch.tensor([_holds(book, models, h) for h in headers]))
        columns = [[int(party[i]) for party in gathered] for i in range(len(headers))]
        ready = [h for h, column in zip(headers, columns) if all(v == HELD for v in column)]
        for header, column in zip(headers, columns):
            if any(v != HELD for v in column) and (header["late"] or NOT_HELD not in column):
                _refuse(book, header, [i for i, v in enumerate(column) if v != HELD])
        for header in ready:  # in party 0's order, the same on every party
            _run_one(comm, book, models, header, run)
            on_done()
        if rank == 0:  # nothing ready: wait for a new query, or for shares on their way, and offer again
            seen, pause = (-1, FIRST_POLL_S) if ready else (added, min(2 * pause, POLL_S))


def _wait_for_queries(book: QueryBook, timeout_s: float, seen: int, broken) -> tuple[list[Query], int]:
    """Party 0: :meth:`QueryBook.oldest` in waits of at most ``WORLD_CHECK_S``, leaving a broken world at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        waiting, added = book.oldest(OFFERED, min(WORLD_CHECK_S, max(0.0, deadline - time.monotonic())), seen)
        reason = broken()
        if reason:
            raise MpcError(reason)
        if (waiting and added != seen) or time.monotonic() >= deadline:
            return waiting, added


def _checked_offer(offer) -> dict:
    """What party 0 broadcast, checked before anything of it is used."""
    if isinstance(offer, dict) and offer.keys() == {"idle"}:
        return offer
    fields = {"client": str, "query": int, "n": int, "model": str, "late": int}
    queries = offer.get("queries") if isinstance(offer, dict) and offer.keys() == {"queries"} else None
    if not isinstance(queries, list) or not 1 <= len(queries) <= OFFERED or not all(
            isinstance(h, dict) and h.keys() == fields.keys() and all(type(h[k]) is t for k, t in fields.items())
            for h in queries):
        raise ProtocolError("INTERNAL", "party 0 sent a malformed offer of queries")
    return offer


def _holds(book: QueryBook, models: ModelShares, header: dict) -> int:
    q = book.find(header["client"], header["query"])
    if q is None:
        return NOT_HELD
    return HELD if _matches(q, models.get(header["model"]), header) else MISMATCH


def _matches(q: Query | None, model_share: np.ndarray | None, header: dict) -> bool:
    """This party holds the query party 0 offered, for the same input count and the model it serves now."""
    return q is not None and model_share is not None and q.num_inputs == header["n"] and q.model_id == header["model"]


def _refuse(book: QueryBook, header: dict, parties: list[int]) -> None:
    """Every party drops a query that some party lacks (after ARRIVAL_S) or holds for another model."""
    q = book.take(header["client"], header["query"])
    if q is not None:
        q.result.set_exception(ProtocolError(
            "ABORTED", f"compute parties {parties} did not hold this query within {ARRIVAL_S:.0f}s of party 0 "
            "(or serve another model): send every party its share of the same query, and retry with a new "
            "query id"))


def _run_one(comm, book: QueryBook, models: ModelShares, header: dict, run) -> None:
    import torch
    q = book.take(header["client"], header["query"])
    model = models.get(header["model"])
    # Held a moment ago, everywhere; checked again now that it is taken (it may have timed out meanwhile).
    flags = comm.all_gather(torch.tensor([int(_matches(q, model, header))]))
    missing = [i for i, f in enumerate(flags) if not int(f)]
    if missing:
        if q is not None:
            q.result.set_exception(ProtocolError("ABORTED", f"compute parties {missing} dropped this query as it "
                                                 "was taken up: retry with a new query id"))
        return
    t0 = time.perf_counter()
    try:
        share = run(q, model)
    except BaseException as e:
        q.result.set_exception(ProtocolError("UNAVAILABLE", f"the MPC failed ({type(e).__name__}); the compute "
                                             "parties form a new world: retry with a new query id"))
        raise
    q.result.set_result((share, time.perf_counter() - t0))
