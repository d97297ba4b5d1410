"""What the commands print: stderr console for progress, tables on stdout, JSON results, the pipeline's progress."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(stderr=True)  # progress and notes; tables and results go to stdout


def table(title: str, headers: Iterable[str], rows: Iterable[Iterable[str]] = ()) -> Table:
    t = Table(title=title)
    for h in headers:
        t.add_column(h)
    for r in rows:
        t.add_row(*r)
    return t


def wide_console(width: int) -> Console:
    """stdout; piped or logged, `width` columns (rather than 80, which squeezes wide tables)."""
    out = Console()
    return out if out.is_terminal else Console(width=width)


def print_table(t: Table) -> None:
    Console().print(t)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def attack_table(rows: list[dict], title: str = "attacks") -> Table:
    from securecollab.scorecard import ATTACK_HEADERS, attack_cells
    return table(title, ATTACK_HEADERS, (attack_cells(r) for r in rows))


class ShowProgress:
    """The pipeline's progress on stderr: a spinner while a step runs, one line when it is done or failed.

    `echo_updates` also prints each of a step's progress messages (the spinner shows only the last).
    `on_done(event)` runs after a step's done line (the demo prints the HE examples there)."""

    def __init__(self, *, echo_updates: bool = False, on_done=None):
        self.echo_updates, self.on_done, self.status = echo_updates, on_done, None

    def __enter__(self) -> ShowProgress:
        return self

    def __exit__(self, *exc) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    def __call__(self, event) -> None:
        if event.kind == "start":
            self._stop()
            note = f" {event.text}" if event.text else ""
            self.status = console.status(f"[bold]{event.label}[/bold]{note} ...")
            self.status.start()
        elif event.kind == "update":
            if self.echo_updates:
                console.print(f"  {event.text}")
            if self.status is not None:
                self.status.update(f"[bold]{event.label}[/bold]: {event.text}")
        elif event.kind == "failed":
            self._stop()
            console.print(f"[red]failed[/red] {event.step}: {event.text}")
        elif event.kind == "done":
            self._stop()
            console.print(f"[green]done[/green] {event.label}: {event.text}")
            if self.on_done:
                self.on_done(event)
