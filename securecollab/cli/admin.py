"""`securecollab health` and `securecollab certs`: operating the services."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from securecollab.cli.options import CertsDir, ServerName

app = typer.Typer()


@app.command()
def health(
    target: Annotated[str, typer.Option(help="Server address host:port.")] = "localhost:50051",
    certs: CertsDir = Path("certs"),
    party_id: Annotated[str, typer.Option("--id", help="Whose certificate to present (any issued by the project CA).")] = "coordinator",
    server_name: ServerName = None,
    service: Annotated[str, typer.Option(help="Service to ask about ('' = the whole server).")] = "",
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for an answer.")] = 5.0,
):
    """Ask a server's gRPC health service over mutual TLS; exit 0 only if it answers SERVING.

    For container health checks and Kubernetes exec probes (their built-in gRPC probes cannot do mTLS)."""
    import grpc

    from securecollab.net.certs import TlsFiles
    from securecollab.net.transport import check_health, make_channel
    channel = make_channel(target, tls=TlsFiles.for_party(certs, party_id), server_name=server_name)
    try:
        status = check_health(channel, service, timeout=timeout)
    except grpc.RpcError as e:
        typer.echo(f"{target}: {e.code().name}: {e.details()}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{target}: {status}")
    raise typer.Exit(0 if status == "SERVING" else 1)


@app.command()
def certs(
    parties: Annotated[list[str], typer.Argument(help="Parties as id[:role], e.g. aggregator client-0 client-1 party-0:party. Role defaults to the id without a trailing -N.")],
    out: Annotated[Path, typer.Option(help="Certificate directory (CA created there if missing).")] = Path("certs"),
    host: Annotated[Optional[list[str]], typer.Option(help="Extra DNS name or IP for every certificate (repeatable).")] = None,
):
    """Create the project CA (if missing) and a certificate per party, carrying the party's role."""
    from securecollab.net.certs import make_certs
    try:
        paths = make_certs(out, parties, hosts=host or ())
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    for p in paths:
        typer.echo(str(p))
