"""`securecollab demo-web`: encrypted inference from a web page served by the HE client process."""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from securecollab.cli.options import CertsDir, DatasetOpt, DatasetPath, Seed, ServerName, Verbose, setup_logging
from securecollab.cli.output import console

app = typer.Typer()


@app.command("demo-web")
def demo_web(
    target: Annotated[Optional[str], typer.Option(
        help="A running HE server, host:port. Without it, a local HE server process is started first "
             "(it trains the convnet on the digits, about a minute) with certificates under --work.")] = None,
    party_id: Annotated[str, typer.Option("--id", help="This client's id (its certificate name).")] = "client-0",
    certs: CertsDir = Path("certs"),
    server_name: ServerName = None,
    host: Annotated[str, typer.Option(help="Address the page is served on (0.0.0.0 inside a container).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the page; 0 picks a free one.")] = 8000,
    port_file: Annotated[Optional[Path], typer.Option(help="Write the page's bound port here (for port 0).")] = None,
    examples: Annotated[int, typer.Option(min=0, max=450, help="Test images the page offers to pick.")] = 24,
    dataset: DatasetOpt = "digits", dataset_path: DatasetPath = None, seed: Seed = 0,
    work: Annotated[Path, typer.Option(help="Without --target: the local server's weights, certificates and "
                                            "logs go here.")] = Path("results/demo-web"),
    out: Annotated[Optional[Path], typer.Option(help="Write this client's transcript (the decrypted logits) here.")] = None,
    connect_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the HE server.")] = 10.0,
    verbose: Verbose = False,
):
    """Serve a local page where you draw a digit or pick a test image and have it classified encrypted.

    This process is the HE client: it makes the CKKS keys and keeps the secret one, encrypts the image,
    queries the HE server over mutual TLS, decrypts the logits and shows them beside the ciphertext bytes,
    the server's evaluation time, the end-to-end time and, for comparison, the server's plaintext API (which
    sees the image; a real deployment would not have it). Open the printed address in a browser; Ctrl-C stops.
    """
    from securecollab.data import load_dataset
    from securecollab.net.certs import TlsFiles
    from securecollab.transcript import TranscriptRecorder
    from services.he_web import HEFront, serve_web
    setup_logging(verbose)
    ds = load_dataset(dataset, seed=seed, path=dataset_path)
    transcript = TranscriptRecorder(out / "transcripts" / f"{party_id}.jsonl" if out else None,
                                    party=party_id, role="client")
    with contextlib.ExitStack() as stack:
        if target is None:
            target, certs = _start_local_server(stack, work, party_id)
        if not (certs / f"{party_id}.pem").exists():
            console.print(f"[red]error[/red]: no certificate {certs / (party_id + '.pem')}: "
                          f"make one with `securecollab certs --out {certs} {party_id}`")
            raise typer.Exit(2)
        front = HEFront(target, tls=TlsFiles.for_party(certs, party_id), party_id=party_id,
                        server_name=server_name, examples=(ds.x_test[:examples], ds.y_test[:examples]),
                        transcript=transcript, connect_timeout=connect_timeout)
        _check_server(front)
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # close the HE session on the way out
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "[::]") else host
        try:
            serve_web(front, host, port, port_file,
                      announce=lambda bound: console.print(f"open http://{shown}:{bound}/ in a browser (Ctrl-C stops)"))
        except KeyboardInterrupt:
            pass


def _start_local_server(stack: contextlib.ExitStack, work: Path, party_id: str) -> tuple[str, Path]:
    """Train the HE model and serve it from a child process; stopped when the page stops."""
    from securecollab.launch import ProcessGroup, ensure_certs
    from securecollab.plans import HEModelPlan
    from securecollab.runs.inference import prepare, start_server
    work.mkdir(parents=True, exist_ok=True)
    with console.status("no --target: training the HE model and starting a local HE server ..."):
        _, _, weights, certs = prepare(HEModelPlan(), work)
        ensure_certs(certs, [party_id])
        group = stack.enter_context(ProcessGroup(work / "logs"))
        port = start_server(group, HEModelPlan(), weights, certs, work / "server", max_batch=1, max_sessions=4)
    console.print(f"local HE server on localhost:{port} (logs in {work / 'logs'})")
    return f"localhost:{port}", certs


def _check_server(front) -> None:
    """Say at once whether the HE server answers; the page serves either way and retries on each request."""
    from services.he_web import FrontError
    with console.status(f"connecting to {front.target} and making CKKS keys ..."):
        try:
            s = front.status()
        except FrontError as e:
            console.print(f"[yellow]warning[/yellow]: {e} (the page will say so and retry)")
            return
    console.print(f"connected to {s['target']} ({s['model']}); public keys sent: "
                  f"{s['session']['context_bytes'] / 1e6:.1f} MB")
