"""Round bookkeeping shared by every server that runs federated rounds: the global model, waiting, finishing."""

from __future__ import annotations

import threading
import time

from securecollab.errors import ProtocolError


class RoundState:
    """The current round and global model; clients block on it until the round they ask for exists."""

    def __init__(self, total_rounds: int, client_ids: list[str], initial):
        self.total_rounds = total_rounds
        self.client_ids = list(client_ids)
        self.round = 0
        self.params = list(initial)
        self.finished: set[str] = set()       # clients that fetched the final model
        self.aggregated_at: list[float] = []  # wall-clock time each round's aggregate was ready
        self.failure: str | None = None
        self._cond = threading.Condition()

    @property
    def done(self) -> bool:
        return self.round >= self.total_rounds

    def check_client(self, client_id: str) -> None:
        if client_id not in self.client_ids:
            raise ProtocolError("NOT_FOUND", f"unknown client {client_id!r}")

    def wait_for_round(self, round_: int, timeout: float | None, client_id: str = "") -> tuple[int, bool, list]:
        """Block until the global model for `round_` exists; returns (round, done, params)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.round >= round_ or self.done or self.failure,
                                       timeout=timeout):
                raise ProtocolError("DEADLINE_EXCEEDED", f"round {round_} not reached in time")
            if self.failure:
                raise ProtocolError("ABORTED", self.failure)
            if self.done and client_id:
                self.finished.add(client_id)
                self._cond.notify_all()
            return self.round, self.done, list(self.params)

    def wait_all_finished(self, clients, timeout: float) -> bool:
        """Block until each of `clients` has the final model, so the server can stop."""
        with self._cond:
            return self._cond.wait_for(lambda: self.done and set(clients) <= self.finished, timeout=timeout)

    def fail(self, message: str) -> None:
        """End training: every waiting and later client call gets ABORTED with this message."""
        with self._cond:
            self.failure = message
            self._cond.notify_all()

    def _advance(self, new_params) -> None:
        """Install the next global model; the caller holds the lock."""
        self.params = list(new_params)
        self.aggregated_at.append(time.time())
        self.round += 1
        self._cond.notify_all()
