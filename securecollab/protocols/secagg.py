"""Secure aggregation: the plan, a compute party's share store, and the coordinator's round state.

Clients send each compute party one additive share of their (fixed-point)
update; a client counts in a round only when every party holds its share.
The coordinator learns only the revealed aggregate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np

from securecollab.errors import ProtocolError, TooFewClients
from securecollab.plans import SecAggPlan
from securecollab.protocols.round_store import RoundStore, SavedRounds
from securecollab.protocols.rounds import RoundState
from securecollab.secagg.sharing import Share


class ShareStore:
    """A compute party's shares, by round and client; thread-safe, refuses duplicates and stale rounds.

    ``length``: the plan's update length, the only one taken (one client must not fix a round's length and
    so have every honest share refused). ``rounds_per_client``: how many rounds not yet aggregated may hold
    a client's shares (an honest client's are in the open round and the aborted ones before it), so that no
    client fills the party's memory with shares for rounds to come."""

    def __init__(self, party: int, client_ids: list[str], min_clients: int = 1, length: int | None = None,
                 rounds_per_client: int | None = None):
        self.party = party
        self.client_ids = set(client_ids)
        self.min_clients = min_clients  # a curious coordinator must not get one client's update alone
        self.length, self.rounds_per_client = length, rounds_per_client
        self.closed_through = -1  # rounds <= this are aggregated and dropped
        self._shares: dict[int, dict[str, Share]] = {}
        self._lock = threading.Lock()

    def put(self, client_id: str, round_: int, share: Share) -> tuple[int, bool]:
        """Holds ``share``; returns (shares held for the round, whether this one is new).

        The very share held already is taken again without effect: an upload whose answer was lost, sent
        again (gRPC retries after UNAVAILABLE). Any other share from a client that has one is refused: a
        client restarted mid-upload makes a fresh sharing, whose other shares would not add up with this one.
        """
        if client_id not in self.client_ids:
            raise ProtocolError("NOT_FOUND", f"unknown client {client_id!r}")
        if share.party != self.party:
            raise ProtocolError("INVALID_ARGUMENT", f"share for party {share.party} sent to party {self.party}")
        self.check_length(share.length)
        with self._lock:
            if round_ <= self.closed_through:
                raise ProtocolError("FAILED_PRECONDITION", f"round {round_} is already aggregated")
            held = self._shares.get(round_, {})
            if client_id in held:
                if held[client_id].same_as(share):
                    return len(held), False
                raise ProtocolError("ALREADY_EXISTS", f"{client_id} already sent its share for round {round_} "
                                    "(a different one)")
            rounds = sorted(r for r, shares in self._shares.items() if client_id in shares)
            if self.rounds_per_client is not None and len(rounds) >= self.rounds_per_client:
                raise ProtocolError("RESOURCE_EXHAUSTED", f"{client_id} has shares in {len(rounds)} rounds not yet "
                                    f"aggregated ({', '.join(map(str, rounds))}); this party holds at most "
                                    f"{self.rounds_per_client}")
            held = self._shares.setdefault(round_, {})
            lengths = {s.length for s in held.values()}
            if lengths and share.length not in lengths:
                raise ProtocolError("INVALID_ARGUMENT",
                                    f"share length {share.length} differs from this round's {lengths.pop()}")
            held[client_id] = share
            return len(held), True

    def check_length(self, length: int) -> None:
        """Refuse (INVALID_ARGUMENT) a share that is not of the plan's update length."""
        if self.length is not None and length != self.length:
            raise ProtocolError("INVALID_ARGUMENT", f"a share of {length} elements; this plan's update vectors "
                                f"have {self.length}")

    def held(self, round_: int) -> list[str]:
        with self._lock:
            return sorted(self._shares.get(round_, {}))

    def lengths(self, round_: int) -> set[int]:
        """The vector lengths of the shares held for `round_` (without taking them)."""
        with self._lock:
            return {s.length or s.dense.size for s in self._shares.get(round_, {}).values()}

    def take(self, round_: int, client_ids: list[str]) -> list[np.ndarray]:
        """The expanded shares of `client_ids`, in that order; closes the round.

        At least `min_clients` distinct clients, and only once per round: otherwise a
        coordinator could reveal a single update, or the difference of two overlapping sums."""
        if len(set(client_ids)) != len(client_ids):
            raise ProtocolError("INVALID_ARGUMENT", f"a client is listed twice in {client_ids}")
        if len(client_ids) < self.min_clients:
            raise ProtocolError("FAILED_PRECONDITION", f"aggregating {len(client_ids)} clients would reveal too "
                                f"much: this party aggregates at least {self.min_clients}")
        with self._lock:
            held = self._shares.get(round_, {})
            missing = [c for c in client_ids if c not in held]
            if missing:
                raise ProtocolError("FAILED_PRECONDITION", f"no share from {missing} for round {round_}")
            shares = [held[c] for c in client_ids]
            # Earlier rounds still here were aborted; their shares will never be used.
            for stale in [r for r in self._shares if r <= round_]:
                del self._shares[stale]
            self.closed_through = max(self.closed_through, round_)
        return ExpandedShares(shares)


class ExpandedShares(Sequence):
    """Shares as ring vectors, a seed expanded only when its vector is read (a running sum holds one at a time)."""

    def __init__(self, shares: list):
        self._shares = shares

    def __len__(self) -> int:
        return len(self._shares)

    def __getitem__(self, i):
        return self._shares[i].expand()


class SecAggRounds(RoundState):
    """Coordinator side: opens rounds, collects upload reports, closes a round at all-reported or deadline.

    With a `store`, every change is saved before it takes effect, and a saved
    training is resumed (`resumed` is then True)."""

    def __init__(self, plan: SecAggPlan, initial, store: RoundStore | None = None):
        super().__init__(plan.training.rounds, plan.training.client_ids(), initial)
        self.plan = plan
        self.store = store
        self.reported: set[str] = set()
        self.first_report_at: float | None = None
        self.history: list[dict] = []
        self.aborted = 0                       # round ids used up by aborted rounds
        self.abort_reason: str | None = None   # set while an aborted round waits for its parties
        self.closing: dict | None = None       # the aggregation asked of the parties for the open round
        saved = store.load() if store else None
        self.resumed = saved is not None
        if saved:
            self.round, self.aborted, self.abort_reason = saved.round, saved.aborted, saved.abort_reason
            self.closing, self.history, self.aggregated_at = saved.closing, saved.history, saved.aggregated_at
            self.params = saved.params
            self.reported = set(saved.reports)
            if saved.reports:  # the upload deadline keeps running from the first report before the restart
                self.first_report_at = time.monotonic() - (time.time() - min(saved.reports.values()))
        elif store:
            self._save()

    def _save(self) -> None:
        if self.store:
            self.store.save(SavedRounds(self.round, self.aborted, self.abort_reason, self.closing, self.history,
                                        self.aggregated_at, self.params))

    @property
    def done(self) -> bool:
        # Aborted rounds left the model unchanged: the plan's rounds count aggregations.
        return self.round - self.aborted >= self.total_rounds

    def report(self, client_id: str, round_: int) -> int:
        self.check_client(client_id)
        with self._cond:
            if self.abort_reason and round_ == self.round:
                raise ProtocolError("FAILED_PRECONDITION", f"round {round_} was aborted: {self.abort_reason}")
            counted = next((h["included"] for h in self.history if h["round"] == round_ and "included" in h), [])
            if client_id in counted:
                # A report repeated after a coordinator restart: that round already counted this client.
                return len(counted)
            if round_ != self.round or self.done:
                raise ProtocolError("FAILED_PRECONDITION", f"report for round {round_}, current is {self.round}")
            if client_id not in self.reported and self.store:
                self.store.add_report(round_, client_id, time.time())
            self.reported.add(client_id)
            self.first_report_at = self.first_report_at or time.monotonic()
            self._notify()
            return len(self.reported)

    def wait_reports(self, open_timeout: float = 3600.0, check=lambda: None, poll_s: float = 1.0) -> set[str]:
        """Until every client reported, or the upload deadline passed since the first report; returns who reported.

        The deadline runs from the first report, not from the round's start, so
        slow local training or slow start-up does not count against uploads.
        `check` runs every `poll_s` without the lock (the coordinator checks its
        parties are alive there; it raises to abort the round)."""
        everyone = self.plan.training.num_clients
        opened = time.monotonic()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: len(self.reported) == everyone, timeout=poll_s)
                first = self.first_report_at
                if len(self.reported) == everyone or (
                        first is not None and time.monotonic() - first >= self.plan.upload_deadline_s):
                    return set(self.reported)
                if first is None and time.monotonic() - opened >= open_timeout:
                    return set()
            check()

    def include(self, held_by_party: list[set[str]]) -> list[str]:
        """Clients whose shares every party holds; refuse the round below the minimum."""
        included = sorted(set.intersection(*held_by_party)) if held_by_party else []
        if len(included) < self.plan.min_clients:
            raise TooFewClients(f"only {len(included)} clients complete, {self.plan.min_clients} required")
        return included

    def set_closing(self, included: list[str]) -> None:
        """Saved before any party is asked: a restarted coordinator asks again for exactly this."""
        with self._cond:
            self.closing = {"round": self.round, "included": list(included)}
            if self.store:
                self.store.set_closing(self.closing)

    def advance(self, new_params, included: list[str]) -> None:
        with self._cond:
            self.history.append({"round": self.round, "included": included})
            self.reported, self.first_report_at, self.closing = set(), None, None
            self._advance(new_params)
            self._save()  # one transaction: the aggregate applied and the next round open

    def abort(self, reason: str) -> None:
        """The current round failed (a compute party did): uploads for it are refused from now on.

        Training stops (ABORTED for every client) once more than the plan's
        `max_aborted_rounds` rounds were aborted."""
        with self._cond:
            self.history.append({"round": self.round, "aborted": reason})
            self.aborted += 1
            self.abort_reason, self.closing = reason, None
            self._save()
            self._notify()
        if self.aborted > self.plan.max_aborted_rounds:
            raise ProtocolError("ABORTED", f"{self.aborted} rounds aborted, the last: {reason}")

    def reopen(self) -> None:
        """After an aborted round: the next round id starts from the same global model."""
        with self._cond:
            self.reported, self.first_report_at, self.abort_reason = set(), None, None
            self.round += 1
            self._save()
            self._notify()

    def last_included(self) -> list[str]:
        """The clients of the last round: those the coordinator waits for before stopping."""
        done = [h for h in self.history if "included" in h]
        return done[-1]["included"] if done else []
