"""Round bookkeeping shared by every server that runs federated rounds: the global model, waiting, finishing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

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
        # Asynchronous waiters by the round they wait for: woken only once it comes (or training ends), not
        # by every report; a thousand waiters woken by each of a thousand reports is a million wake-ups a round.
        self._waiting: dict[int, set[Callable[[], None]]] = {}

    @property
    def done(self) -> bool:
        return self.round >= self.total_rounds

    def check_client(self, client_id: str) -> None:
        if client_id not in self.client_ids:
            raise ProtocolError("NOT_FOUND", f"unknown client {client_id!r}")

    def wait_for_round(self, round_: int, timeout: float | None, client_id: str = "") -> tuple[int, bool, list]:
        """Block until the global model for `round_` exists; returns (round, done, params)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._reached(round_), timeout=timeout):
                raise ProtocolError("DEADLINE_EXCEEDED", f"round {round_} not reached in time")
            return self._hand_out(client_id)

    async def wait_for_round_async(self, round_: int, timeout: float, client_id: str = "") -> tuple[int, bool, list]:
        """`wait_for_round` for a handler on an event loop: the caller's task waits, no thread is held."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def wake():  # called with the lock held, from whichever thread changed the state
            loop.call_soon_threadsafe(changed.set)

        deadline = loop.time() + timeout
        with self._cond:
            self._waiting.setdefault(round_, set()).add(wake)
        try:
            while True:
                with self._cond:
                    changed.clear()  # a change from here on sets it again
                    if self._reached(round_):
                        return self._hand_out(client_id)
                if loop.time() >= deadline:
                    raise ProtocolError("DEADLINE_EXCEEDED", f"round {round_} not reached in time")
                try:
                    await asyncio.wait_for(changed.wait(), deadline - loop.time())
                except TimeoutError:
                    pass  # looked at once more above
        finally:
            with self._cond:
                waiting = self._waiting.get(round_, set())
                waiting.discard(wake)
                if not waiting:
                    self._waiting.pop(round_, None)

    def _reached(self, round_: int) -> bool:
        return self.round >= round_ or self.done or bool(self.failure)

    def _hand_out(self, client_id: str) -> tuple[int, bool, list]:
        """The round a waiter asked for has come (the caller holds the lock): the model, or the failure."""
        if self.failure:
            raise ProtocolError("ABORTED", self.failure)
        if self.done and client_id:
            self.finished.add(client_id)
            self._notify()
        return self.round, self.done, list(self.params)

    def _notify(self) -> None:
        """The state changed (the caller holds the lock): wake every waiting thread, and the tasks whose round
        has come."""
        self._cond.notify_all()
        for round_, waiting in self._waiting.items():
            if self._reached(round_):
                for wake in waiting:
                    wake()

    def wait_all_finished(self, clients, timeout: float) -> bool:
        """Block until each of `clients` has the final model, so the server can stop."""
        with self._cond:
            return self._cond.wait_for(lambda: self.done and set(clients) <= self.finished, timeout=timeout)

    def fail(self, message: str) -> None:
        """End training: every waiting and later client call gets ABORTED with this message."""
        with self._cond:
            self.failure = message
            self._notify()

    def _advance(self, new_params) -> None:
        """Install the next global model; the caller holds the lock."""
        self.params = list(new_params)
        self.aggregated_at.append(time.time())
        self.round += 1
        self._notify()
