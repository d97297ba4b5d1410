"""`securecollab attack ...`: list the attacks, run one on a saved run, or run an experiment (a sweep)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

attack_app = typer.Typer(
    help="Attack what one party received. `list` shows the attacks and experiments; `run NAME RUN_DIR` attacks "
         "a saved protocol run (the adversary's transcript under RUN_DIR/transcripts/); `sweep NAME` runs an "
         "experiment: the protocol runs it needs (real services) and its attacks, with figures.",
    no_args_is_help=True)
console = Console(stderr=True)


def attack_table(rows: list[dict], title: str = "attacks") -> Table:
    from securecollab.scorecard import ATTACK_HEADERS, attack_cells
    table = Table(title=title)
    for h in ATTACK_HEADERS:
        table.add_column(h)
    for r in rows:
        table.add_row(*attack_cells(r))
    return table


def _print(rows: list[dict], title: str) -> None:
    out = Console()
    if not out.is_terminal:
        out = Console(width=150)
    out.print(attack_table(rows, title))


@attack_app.command("list")
def list_attacks():
    """The registered attacks (run on a saved run) and experiments (sweeps that make their own runs)."""
    from attacks.registry import ATTACKS, EXPERIMENTS, discover
    discover()
    out = Console()
    t = Table(title="attacks: securecollab attack run NAME RUN_DIR")
    for h in ("name", "adversary", "protocols", "what"):
        t.add_column(h)
    for a in sorted(ATTACKS.values(), key=lambda a: a.name):
        t.add_row(a.name, a.adversary, ", ".join(a.protocols), a.summary)
    out.print(t)
    t = Table(title="experiments: securecollab attack sweep NAME")
    for h in ("name", "minutes (quick / full, 2 cores)", "attacks", "what"):
        t.add_column(h)
    for e in sorted(EXPERIMENTS.values(), key=lambda e: e.name):
        t.add_row(e.name, f"~{e.minutes[0]:g} / ~{e.minutes[1]:g}", ", ".join(e.attacks), e.summary)
    out.print(t)


@attack_app.command("run")
def run(
    name: Annotated[str, typer.Argument(help="Attack name (see `securecollab attack list`).")],
    run_dir: Annotated[Path, typer.Argument(help="A protocol run's output directory (holds transcripts/).")],
    out: Annotated[Path, typer.Option(help="Write the scorecard rows here (JSON).")] = None,
    quick: Annotated[bool, typer.Option(help="Fewer optimization steps where an attack optimizes.")] = False,
):
    """Run one attack on a saved run; prints its scorecard rows (metric beside baseline)."""
    from attacks.registry import ATTACKS, discover, run_attack
    discover()
    if name not in ATTACKS:
        console.print(f"[red]unknown attack {name!r}[/red]; choose from {', '.join(sorted(ATTACKS))}")
        raise typer.Exit(2)
    if not (run_dir / "transcripts").is_dir():
        console.print(f"[red]{run_dir} holds no transcripts/ directory[/red]: give a protocol run's --out directory")
        raise typer.Exit(2)
    try:
        with console.status(f"[bold]{name}[/bold] on {run_dir} ..."):
            rows = run_attack(name, run_dir, quick=quick)
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]{name} cannot run on {run_dir}:[/red] {e}")
        raise typer.Exit(2) from e
    _print(rows, f"{name} on {run_dir}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1))
        console.print(f"wrote {out}")


@attack_app.command("sweep")
def sweep(
    name: Annotated[str, typer.Argument(help="Experiment name (see `securecollab attack list`).")],
    out: Annotated[Path, typer.Option(help="Directory for the runs, rows.json and figures.")] = Path("results/attacks"),
    quick: Annotated[bool, typer.Option("--quick/--full", help="Quick (minutes) or thorough.")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the plans (data split, model init, batch order).")] = 0,
):
    """Run an experiment: real protocol runs, then its attacks on the adversaries' transcripts, with figures."""
    from attacks.registry import EXPERIMENTS, discover, run_experiment
    discover()
    if name not in EXPERIMENTS:
        console.print(f"[red]unknown experiment {name!r}[/red]; choose from {', '.join(sorted(EXPERIMENTS))}")
        raise typer.Exit(2)
    target = out / name
    with console.status(f"[bold]{name}[/bold] ...") as status:
        def progress(msg: str) -> None:
            console.print(f"  {msg}")
            status.update(f"[bold]{name}[/bold]: {msg}")
        rows = run_experiment(name, target, quick=quick, seed=seed, progress=progress)
    (target / "rows.json").write_text(json.dumps(rows, indent=1))
    _print(rows, f"{name} ({'quick' if quick else 'full'})")
    console.print(f"wrote {target / 'rows.json'} and figures in {target}")
