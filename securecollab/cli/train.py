"""`securecollab train`: one protocol, every party a local process; and the centralized baseline's worker."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from securecollab.cli.client import parse_malice
from securecollab.cli.options import NarrowRing, defence_options, dp_options, training_options, uses
from securecollab.cli.output import console

app = typer.Typer()


class TrainProtocol(str, Enum):
    centralized = "centralized"
    fedavg = "fedavg"
    secagg = "secagg"
    split = "split"


FEDERATED = ("fedavg", "secagg")


@app.command()
@uses(plan=training_options, dp=dp_options, defence=defence_options)
def train(
    protocol: Annotated[TrainProtocol, typer.Option(help="Which protocol trains the model.")] = TrainProtocol.fedavg,
    out: Annotated[Path, typer.Option(help="Output directory (results, costs, transcripts).")] = Path("results/train"),
    malicious: Annotated[Optional[list[str]], typer.Option(
        help='fedavg/secagg: make a client malicious, CLIENT=MALICE_JSON (repeat), e.g. client-0=\'{"behaviour": '
             '"model_replacement", "target": 0, "poison_fraction": 0.5, "from_round": 9}\' (see `client --malice`).'
    )] = None,
    narrow_ring: NarrowRing = True,
    plan=None, dp=None, defence=None,
):
    """Train with one protocol (all parties as local processes) and print accuracy and costs.

    The defence options act where the protocol aggregates: inside MPC for secagg (on shares; nothing but the
    aggregate is revealed), in the clear for fedavg (the aggregator reads every update)."""
    from securecollab.plans import SecAggPlan
    from securecollab.runs import run_protocol
    name = protocol.value
    if name not in FEDERATED and (dp["dp_noise"] or malicious or defence["norm_bound"] or defence["robust"]):
        raise typer.BadParameter("DP-SGD, malicious clients and defences are for fedavg and secagg")
    kwargs = {}
    if name == "secagg":
        plan = plan(**dp)
        try:
            kwargs["secagg"] = SecAggPlan(training=plan, narrow_ring=narrow_ring, **defence)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from e
    else:
        plan = plan(**dp, **defence)
    if malicious:
        kwargs["malicious"] = _malicious(malicious, plan.client_ids())
    with console.status(f"training with {name} ..."):
        result = run_protocol(name, plan, out, **kwargs)
    typer.echo(json.dumps(result, indent=2))


def _malicious(items: list[str], clients: list[str]) -> dict:
    out = {}
    for item in items:
        cid, sep, text = item.partition("=")
        if not sep or cid not in clients:
            raise typer.BadParameter(f"{item!r}: give CLIENT=MALICE_JSON with CLIENT one of {clients}",
                                     param_hint="--malicious")
        out[cid] = parse_malice(text)
    return out


@app.command("train-centralized", hidden=True)
def train_centralized(plan_json: Annotated[str, typer.Option()], out: Annotated[Path, typer.Option()]):
    """Worker for the centralized baseline (run in its own process so its costs are its own)."""
    from securecollab.plans import FedAvgPlan
    from securecollab.runs.training import centralized_worker
    centralized_worker(FedAvgPlan.from_json(plan_json), out)
