"""`securecollab infer`: classify images on a running HE server, encrypted here, decrypted here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from securecollab.cli.options import CertsDir, DatasetOpt, DatasetPath, Seed, ServerName, Verbose, setup_logging
from securecollab.cli.output import console, print_table, table, write_json

app = typer.Typer()


def _run_infer(target, certs, party_id, server_name, transcript, x, batch, connect_timeout, compare_plain=False):
    import numpy as np

    from securecollab.net.certs import TlsFiles
    from services.he_client import HEClient
    with HEClient(target, tls=TlsFiles.for_party(certs, party_id), party_id=party_id, server_name=server_name,
                  transcript=transcript, connect_timeout=connect_timeout) as client:
        if tuple(x.shape[1:]) != client.description.input_shape:
            raise typer.BadParameter(f"inputs are shaped {x.shape[1:]}, the model takes {client.description.input_shape}")
        with console.status("making CKKS keys and opening a session ..."):
            session = client.open_session(batch_size=len(x) if batch else 0)
        console.print(f"session: {session['context_bytes'] / 1e6:.1f} MB of public keys "
                      f"(made in {session['keygen_s']:.2f}s, server set-up {session['server_setup_s']:.2f}s)")
        with console.status(f"{len(x)} encrypted {'batched ' if batch else ''}quer{'y' if batch else 'ies'} ..."):
            logits = client.infer_batch(x) if batch else np.stack([client.infer(xi) for xi in x])
        costs = client.meter.snapshot()
        plain = client.predict_plain(x) if compare_plain else None
        return client, logits, session, client.batched if batch else client.single, costs, plain


@app.command()
def infer(
    target: Annotated[str, typer.Option(help="HE inference server address host:port.")],
    party_id: Annotated[str, typer.Option("--id", help="This client's id (its certificate name).")] = "client-0",
    certs: CertsDir = Path("certs"),
    server_name: ServerName = None,
    count: Annotated[int, typer.Option(min=1, help="How many test images to classify.")] = 10,
    batch: Annotated[bool, typer.Option(help="Pack all the images into one batched query instead of one query each.")] = False,
    inputs: Annotated[Optional[Path], typer.Option(help="A .npy array of inputs shaped (n, *input_shape) instead of test images.")] = None,
    dataset: DatasetOpt = "digits", dataset_path: DatasetPath = None, seed: Seed = 0,
    out: Annotated[Optional[Path], typer.Option(help="Write results, costs and the client transcript here.")] = None,
    connect_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the server to answer.")] = 15.0,
    compare_plain: Annotated[bool, typer.Option(help="Also ask the server's plaintext API (the baseline, which sees the inputs) and compare logits.")] = False,
    verbose: Verbose = False,
):
    """Classify images on a running HE server: encrypted here, evaluated there, decrypted here."""
    import grpc
    import numpy as np

    from securecollab.data import load_dataset
    from securecollab.transcript import TranscriptRecorder
    setup_logging(verbose)
    labels = None
    if inputs:
        x = np.load(inputs, allow_pickle=False).astype("float32")[:count]
    else:
        ds = load_dataset(dataset, seed=seed, path=dataset_path)
        x, labels = ds.x_test[:count], ds.y_test[:count]
    transcript = TranscriptRecorder(out / "transcripts" / f"{party_id}.jsonl" if out else None,
                                    party=party_id, role="client")
    try:
        client, logits, session, timings, costs, plain = _run_infer(
            target, certs, party_id, server_name, transcript, x, batch, connect_timeout, compare_plain)
    except TimeoutError as e:
        console.print(f"[red]error[/red]: cannot reach the HE server at {target}: {e}")
        raise typer.Exit(1) from None
    except grpc.RpcError as e:
        console.print(f"[red]error[/red]: the HE server refused: {e.code().name}: {e.details()}")
        raise typer.Exit(1) from None
    print_table(table(f"encrypted inference: {client.description.model}", ["#", "label", "prediction", "top logit"],
                      ((str(i), "-" if labels is None else str(labels[i]), str(int(row.argmax())), f"{row.max():.3f}")
                       for i, row in enumerate(logits))))
    per = timings.queries or 1
    console.print(f"per {'batch' if batch else 'query'}: encrypt {timings.encrypt_s / per:.3f}s, "
                  f"network+server {timings.rpc_s / per:.3f}s (server {timings.server_s / per:.3f}s), "
                  f"decrypt {timings.decrypt_s / per:.4f}s; sent {costs['bytes_sent'] / 1e6:.2f} MB, "
                  f"received {costs['bytes_received'] / 1e6:.2f} MB in all")
    result = {"predictions": logits.argmax(1).tolist(), "logits": logits.tolist(), "session": session,
              "costs": costs}
    if labels is not None:
        result["accuracy"] = float((logits.argmax(1) == labels).mean())
        console.print(f"accuracy on these {len(x)} images: {result['accuracy']:.3f}")
    if plain is not None:
        result["plain_agreement"] = float((logits.argmax(1) == plain.argmax(1)).mean())
        result["max_abs_error"] = float(np.abs(logits - plain).max())
        console.print(f"vs the server's plaintext API: argmax agreement {result['plain_agreement']:.3f}, "
                      f"max |logit error| {result['max_abs_error']:.2e}")
    if out:
        write_json(out / f"infer_{party_id}.json", result)
