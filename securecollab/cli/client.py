"""`securecollab client fedavg|split|secagg`: one protocol client against running services."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from securecollab.cli.options import CertsDir, ServerName, Verbose, setup_logging, uses

app = typer.Typer(help="Run one client of a protocol against running services.", no_args_is_help=True)

MaliceJson = Annotated[Optional[str], typer.Option(
    "--malice", help='Make this client malicious (securecollab.poisoning), e.g. \'{"behaviour": "model_replacement", '
                     '"target": 0, "poison_fraction": 0.5, "from_round": 9}\'. Behaviours: sign_flip, scale, random, '
                     'backdoor, model_replacement, adaptive (needs "bound"), wraparound.')]


def parse_malice(text: str | None):
    if not text:
        return None
    from securecollab.poisoning import Malice
    try:
        return Malice.from_json(text)
    except (ValueError, TypeError) as e:  # bad JSON, unknown behaviour or field, out-of-range value
        raise typer.BadParameter(f"--malice: {e}") from None


@dataclass(frozen=True)
class Client:
    target: str
    party_id: str
    index: int
    certs: Path
    server_name: str | None
    out: Path | None

    def run(self, run_client, **options) -> None:
        """Run one protocol client with its certificate and print its summary line."""
        from securecollab.net.certs import TlsFiles
        result = run_client(self.target, self.party_id, self.index, tls=TlsFiles.for_party(self.certs, self.party_id),
                            server_name=self.server_name, out_dir=self.out, **options)
        typer.echo(json.dumps({k: result[k] for k in ("client_id", "num_examples", "test_accuracy")}))


def client_options(
    target: Annotated[str, typer.Option(
        help="Server address host:port (the aggregator, split server or coordinator).")],
    party_id: Annotated[str, typer.Option("--id", help="Client id, e.g. client-0 (must match its certificate).")],
    index: Annotated[int, typer.Option(min=0, help="Which data shard this client holds.")],
    certs: CertsDir = Path("certs"),
    server_name: ServerName = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Write result, costs and transcript here (split: also the client-side weights).")] = None,
    verbose: Verbose = False,
) -> Client:
    """Group: what every client takes (where the server is, who this client is, where to write)."""
    setup_logging(verbose)
    return Client(target, party_id, index, certs, server_name, out)


@app.command("fedavg")
@uses(client=client_options)
def fedavg(client=None, malice: MaliceJson = None):
    """Take part in plain FedAvg rounds until the aggregator says training is done."""
    from services.fedavg_client import run_client
    client.run(run_client, malice=parse_malice(malice))


@app.command("split")
@uses(client=client_options)
def split(client=None):
    """Train the layers up to the cut (and the head, U-shaped) on this client's data; only activations leave."""
    from services.split_client import run_client
    client.run(run_client)


@app.command("secagg")
@uses(client=client_options)
def secagg(
    client=None,
    drop: Annotated[Optional[str], typer.Option(
        help="Fault injection: vanish at before_upload, mid_upload, partial_upload or after_upload.")] = None,
    drop_round: Annotated[int, typer.Option(help="Round in which --drop happens.")] = 0,
    boost: Annotated[float, typer.Option(
        help="Fault injection: multiply this client's update (a malicious client).")] = 1.0,
    malice: MaliceJson = None,
):
    """Take part in FedAvg over secure aggregation: each round's update leaves only as secret shares."""
    from services.secagg_client import DROP_PHASES, run_client
    if drop and drop not in DROP_PHASES:
        raise typer.BadParameter(f"--drop must be one of {DROP_PHASES}")
    client.run(run_client, drop=drop, drop_round=drop_round, boost=boost, malice=parse_malice(malice))


@app.command("mpc-owner")
def mpc_owner(
    party_target: Annotated[list[str], typer.Option(
        help="Each inference compute party's host:port, in index order (repeat).")],
    party_id: Annotated[str, typer.Option("--id", help="The owner's id (its certificate, role owner).")] = "owner",
    certs: CertsDir = Path("certs"),
    server_name: ServerName = None,
    weights: Annotated[Optional[Path], typer.Option(
        help="The model's weights (.npz, numpy only); default: train the parties' architecture here, from a secret "
             "seed (the parties and clients know the architecture and the data set).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the trained weights (mpc_model.npz) here.")] = None,
    connect_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for each party.")] = 60.0,
    verbose: Verbose = False,
):
    """Model owner of a model-private inference deployment: secret-shares its model's weights over the compute
    parties (one share each; none of them, nor any client, ever holds the weights)."""
    import secrets

    import grpc

    from securecollab.net.certs import TlsFiles
    from securecollab.plans import MpcInferencePlan, save_weights
    from services.mpc_client import describe, upload_model
    setup_logging(verbose)
    tls = TlsFiles.for_party(certs, party_id)
    try:
        deployment = describe(party_target, tls=tls, server_name=server_name, connect_timeout=connect_timeout)
        plan: MpcInferencePlan = deployment.plan
        if weights:
            model, _ = plan.load(weights)
        else:
            typer.echo(f"training {plan.model} ({plan.activation}) on {plan.dataset}: {plan.epochs} epochs, from a "
                       "secret seed", err=True)
            model, _ = plan.train(seed=secrets.randbits(31))
            if out:
                save_weights(model, out / "mpc_model.npz")
        model_id = upload_model(party_target, tls=tls, model=model, server_name=server_name,
                                connect_timeout=connect_timeout)
    except (TimeoutError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None
    except grpc.RpcError as e:
        typer.echo(f"error: a compute party refused: {e.code().name}: {e.details()}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps({"model_id": model_id, "parties": len(party_target), "output": plan.output}))
