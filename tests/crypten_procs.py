"""Helpers for tests that run CrypTen parties as subprocesses."""

import os
from pathlib import Path

from securecollab.runs.training import free_port  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parents[1]


def party_env() -> dict:
    """The environment for a party subprocess: the repo importable, no stale rendezvous, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    for key in ("RENDEZVOUS", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"):
        env.pop(key, None)  # stale rendezvous settings must not leak in
    env["OMP_NUM_THREADS"] = "1"  # several parties share few cores
    return env
