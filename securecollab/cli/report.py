"""`securecollab report RESULTS_DIR`: the scorecard as one self-contained web page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer()


@app.command()
def report(
    results_dir: Annotated[Path, typer.Argument(help="A demo's output directory (holds scorecard.json and figures).")],
    out: Annotated[Optional[Path], typer.Option(help="Where to write the page (default RESULTS_DIR/report.html).")] = None,
):
    """Write report.html from RESULTS_DIR/scorecard.json: the protocols table (costs beside the plain
    baseline), the attack table (baselines, 95% intervals) and every figure, embedded, so the one file
    can be sent around. `securecollab demo` writes it too."""
    from securecollab.report import load_scorecard, write_report
    try:
        path = write_report(load_scorecard(results_dir), results_dir, out)
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {path}")
