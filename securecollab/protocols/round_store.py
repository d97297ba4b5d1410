"""The coordinator's round state on disk (SQLite), so that a restarted coordinator resumes where it stopped.

Kept: the plan, the current round and global model, the history, who reported in
the open round, and the aggregation request of a round being closed. That request
is saved before any party hears of it and is re-sent as it is after a restart; the
parties answer a repeated request with the same result shares. So no accepted share
is lost (they stay with the parties until aggregated) and none is counted twice
(a round's aggregate is applied in the same transaction that moves to the next).
The shares themselves never reach the coordinator, so this file holds none.
"""

from __future__ import annotations

import io
import json
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from securecollab.errors import ProtocolError

SCHEMA = """
CREATE TABLE IF NOT EXISTS training (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    plan TEXT NOT NULL,
    round INTEGER NOT NULL,
    aborted INTEGER NOT NULL,
    abort_reason TEXT,
    history TEXT NOT NULL,
    aggregated_at TEXT NOT NULL,
    params BLOB NOT NULL
);
-- Apart from the model: SQLite rewrites a whole row to change one column, so saving the closing request in
-- the row of a 4 MB model cost ~50 ms a round.
CREATE TABLE IF NOT EXISTS closing (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    request TEXT
);
CREATE TABLE IF NOT EXISTS reports (
    round INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (round, client_id)
);
"""


@dataclass
class SavedRounds:
    round: int
    aborted: int
    abort_reason: str | None
    closing: dict | None          # {"round", "included"}: the aggregation asked of the parties
    history: list[dict]
    aggregated_at: list[float]
    params: list[tuple[str, np.ndarray]]
    reports: dict[str, float] = field(default_factory=dict)  # client -> wall time, open round only


def params_to_bytes(params) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{f"{i:04d}": np.asarray(a) for i, (_, a) in enumerate(params)})
    return json.dumps([n for n, _ in params]).encode() + b"\n" + buf.getvalue()


def params_from_bytes(blob: bytes) -> list[tuple[str, np.ndarray]]:
    head, _, body = blob.partition(b"\n")
    names = json.loads(head)
    with np.load(io.BytesIO(body), allow_pickle=False) as f:
        return [(n, f[f"{i:04d}"]) for i, n in enumerate(names)]


class RoundStore:
    """One coordinator's state file; every write is one durable transaction."""

    def __init__(self, path: str | Path, plan_json: str):
        self.path = Path(path)
        self.plan_json = plan_json
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a saved round survives a power cut, not only a crash
        self._db.executescript(SCHEMA)
        self._migrate()
        self._lock = threading.Lock()

    def _migrate(self) -> None:
        """A state file of the version that kept the closing request in the model's row: move it out."""
        if "closing" not in {row[1] for row in self._db.execute("PRAGMA table_info(training)")}:
            return
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO closing SELECT 0, closing FROM training WHERE id = 0")
            self._db.execute("ALTER TABLE training DROP COLUMN closing")

    def load(self) -> SavedRounds | None:
        """The saved training, or None; refuses a file that holds another plan's training."""
        with self._lock:
            row = self._db.execute("SELECT plan, round, aborted, abort_reason, history, aggregated_at, params "
                                   "FROM training WHERE id = 0").fetchone()
            if row is None:
                return None
            plan, round_, aborted, reason, history, at, params = row
            closing = (self._db.execute("SELECT request FROM closing WHERE id = 0").fetchone() or (None,))[0]
            if plan != self.plan_json:
                raise ProtocolError("FAILED_PRECONDITION", f"{self.path} holds the state of another training "
                                    "(a different plan); remove it, or start the coordinator with --fresh, to run this one")
            reports = dict(self._db.execute("SELECT client_id, at FROM reports WHERE round = ?", (round_,)))
        return SavedRounds(round_, aborted, reason, json.loads(closing) if closing else None, json.loads(history),
                           json.loads(at), params_from_bytes(params), reports)

    def save(self, s: SavedRounds) -> None:
        """The whole round state at once (reports of rounds before the current one are dropped)."""
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO training VALUES (0, ?, ?, ?, ?, ?, ?, ?)",
                (self.plan_json, s.round, s.aborted, s.abort_reason, json.dumps(s.history),
                 json.dumps(s.aggregated_at), params_to_bytes(s.params)))
            self._write_closing(s.closing)
            self._db.execute("DELETE FROM reports WHERE round < ?", (s.round,))

    def set_closing(self, closing: dict | None) -> None:
        with self._lock, self._db:
            self._write_closing(closing)

    def _write_closing(self, closing: dict | None) -> None:
        self._db.execute("INSERT OR REPLACE INTO closing VALUES (0, ?)", (json.dumps(closing) if closing else None,))

    def add_report(self, round_: int, client_id: str, at: float) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR IGNORE INTO reports VALUES (?, ?, ?)", (round_, client_id, at))

    def clear(self) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM training")
            self._db.execute("DELETE FROM closing")
            self._db.execute("DELETE FROM reports")

    def close(self) -> None:
        with self._lock:
            self._db.close()
