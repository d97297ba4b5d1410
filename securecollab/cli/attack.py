"""`securecollab attack ...`: list the attacks, run one on a saved run, or run an experiment (a sweep)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from securecollab.cli.output import ShowProgress, attack_table, console, table, wide_console

attack_app = typer.Typer(
    help="Attack what one party received. `list` shows the attacks and experiments; `run NAME RUN_DIR` attacks "
         "a saved protocol run (the adversary's transcript under RUN_DIR/transcripts/); `sweep NAME` runs an "
         "experiment: the protocol runs it needs (real services) and its attacks, with figures.",
    no_args_is_help=True)


def _print(rows: list[dict], title: str) -> None:
    wide_console(150).print(attack_table(rows, title))


@attack_app.command("list")
def list_attacks():
    """The registered attacks (run on a saved run) and experiments (sweeps that make their own runs)."""
    from rich.console import Console

    from attacks.registry import ATTACKS
    from experiments.registry import EXPERIMENTS
    from securecollab.pipeline import discover
    discover()
    out = Console()
    out.print(table("attacks: securecollab attack run NAME RUN_DIR", ("name", "adversary", "protocols", "what"),
                    ([a.name, a.adversary, ", ".join(a.protocols), a.summary]
                     for a in sorted(ATTACKS.values(), key=lambda a: a.name))))
    out.print(table("experiments: securecollab attack sweep NAME",
                    ("name", "minutes (quick / full, 2 cores)", "attacks", "what"),
                    ([e.name, f"~{e.minutes[0]:g} / ~{e.minutes[1]:g}", ", ".join(e.attacks), e.summary]
                     for e in sorted(EXPERIMENTS.values(), key=lambda e: e.name))))


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
    from securecollab import pipeline
    names = pipeline.experiment_order()
    if name not in names:
        console.print(f"[red]unknown experiment {name!r}[/red]; choose from {', '.join(sorted(names))}")
        raise typer.Exit(2)
    with ShowProgress(echo_updates=True) as progress:
        rows, path = pipeline.sweep(name, out, quick=quick, seed=seed, progress=progress)
    _print(rows, f"{name} ({'quick' if quick else 'full'})")
    console.print(f"wrote {path} and figures in {path.parent}")
