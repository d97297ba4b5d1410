"""Named crash points for fault tests (like etcd's gofail): make a process die at an exact step.

`SECURECOLLAB_FAILPOINTS="coordinator.revealed@2,..."` makes the process exit with
`EXIT_FAILPOINT` when it reaches the point of that name in that round. Unset (always,
outside tests), a failpoint is one environment lookup. Timing-based kills cannot hit
windows such as "after the aggregate was revealed, before it was saved".
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)
ENV = "SECURECOLLAB_FAILPOINTS"
EXIT_FAILPOINT = 86


def failpoint(name: str, round_: int, *, linger_s: float = 0.0) -> None:
    """Exit here if `name@round_` is armed; `linger_s` first lets calls already made reach their peers."""
    armed = os.environ.get(ENV, "")
    if not armed or f"{name}@{round_}" not in armed.split(","):
        return
    log.error("failpoint %s@%d: crashing here (exit %d)", name, round_, EXIT_FAILPOINT)
    time.sleep(linger_s)
    logging.shutdown()
    os._exit(EXIT_FAILPOINT)
