"""`securecollab train`: one protocol, every party a local process; and the centralized baseline's worker."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from securecollab.cli.options import dp_options, training_options, uses
from securecollab.cli.output import console

app = typer.Typer()


class TrainProtocol(str, Enum):
    centralized = "centralized"
    fedavg = "fedavg"
    secagg = "secagg"
    split = "split"


@app.command()
@uses(plan=training_options, dp=dp_options)
def train(
    protocol: Annotated[TrainProtocol, typer.Option(help="Which protocol trains the model.")] = TrainProtocol.fedavg,
    out: Annotated[Path, typer.Option(help="Output directory (results, costs, transcripts).")] = Path("results/train"),
    plan=None, dp=None,
):
    """Train with one protocol (all parties as local processes) and print accuracy and costs."""
    from securecollab.runs import run_protocol
    plan = plan(**dp)
    if plan.dp and protocol.value not in ("fedavg", "secagg"):
        raise typer.BadParameter("DP-SGD local training is for fedavg and secagg clients", param_hint="--dp-noise")
    with console.status(f"training with {protocol.value} ..."):
        result = run_protocol(protocol.value, plan, out)
    typer.echo(json.dumps(result, indent=2))


@app.command("train-centralized", hidden=True)
def train_centralized(plan_json: Annotated[str, typer.Option()], out: Annotated[Path, typer.Option()]):
    """Worker for the centralized baseline (run in its own process so its costs are its own)."""
    from securecollab.plans import FedAvgPlan
    from securecollab.runs.training import centralized_worker
    centralized_worker(FedAvgPlan.from_json(plan_json), out)
