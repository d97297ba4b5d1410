"""`securecollab infer`: classify images on a running HE server (encrypted here, decrypted here), or on the compute
parties of a model-private MPC deployment (secret-shared here, answer shares added up here)."""

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


def _run_mpc(party_target, certs, party_id, server_name, transcript, x, batch, connect_timeout):
    import numpy as np

    from securecollab.net.certs import TlsFiles
    from services.mpc_client import MpcInferenceClient
    with MpcInferenceClient(party_target, tls=TlsFiles.for_party(certs, party_id), party_id=party_id,
                            server_name=server_name, transcript=transcript, connect_timeout=connect_timeout) as c:
        d = c.deployment
        if tuple(x.shape[1:]) != d.input_shape:
            raise typer.BadParameter(f"inputs are shaped {x.shape[1:]}, the model takes {d.input_shape}")
        step = d.plan.max_batch if batch else 1
        with console.status(f"{len(x)} secret-shared {'batched ' if batch else ''}quer{'y' if batch else 'ies'} ..."):
            answers = np.concatenate([c.infer(x[i:i + step]) for i in range(0, len(x), step)])
        return c, answers, c.meter.snapshot()


def _infer_mpc(party_target, certs, party_id, server_name, transcript, x, labels, batch, connect_timeout, out):
    import grpc
    try:
        c, answers, costs = _run_mpc(party_target, certs, party_id, server_name, transcript, x, batch, connect_timeout)
    except (TimeoutError, ValueError) as e:
        console.print(f"[red]error[/red]: {e}")
        raise typer.Exit(1) from None
    except grpc.RpcError as e:
        console.print(f"[red]error[/red]: a compute party refused: {e.code().name}: {e.details()}")
        raise typer.Exit(1) from None
    d, tm = c.deployment, c.timings
    predictions = answers if d.plan.output == "label" else answers.argmax(1)
    print_table(table(f"model-private inference (MPC, {d.plan.n_parties} parties, output {d.plan.output}): "
                      f"{d.plan.model}", ["#", "label", "prediction", "top logit"],
                      ((str(i), "-" if labels is None else str(labels[i]), str(int(p)),
                        "-" if d.plan.output == "label" else f"{answers[i].max():.3f}")
                       for i, p in enumerate(predictions))))
    console.print(f"per query: share {tm.share_s / tm.queries:.4f}s, network+MPC {tm.rpc_s / tm.queries:.3f}s (MPC "
                  f"{tm.mpc_s / tm.queries:.3f}s); sent {costs['bytes_sent'] / 1e6:.3f} MB, received "
                  f"{costs['bytes_received'] / 1e6:.3f} MB in all")
    result = {"protocol": "mpc", "output": d.plan.output, "model_id": d.model_id,
              "predictions": predictions.tolist(), "costs": costs,
              "latencies_s": tm.latencies}
    if d.plan.output == "logits":
        result["logits"] = answers.tolist()
    if labels is not None:
        result["accuracy"] = float((predictions == labels).mean())
        console.print(f"accuracy on these {len(x)} images: {result['accuracy']:.3f}")
    if out:
        write_json(out / f"infer_{party_id}.json", result)


@app.command()
def infer(
    target: Annotated[Optional[str], typer.Option(help="HE: the inference server's address host:port.")] = None,
    protocol: Annotated[str, typer.Option(
        help="he: encrypted inference (CKKS; you get logits). mpc: model-private inference on secret shares "
             "(the deployment decides logits or label only).")] = "he",
    party_target: Annotated[Optional[list[str]], typer.Option(
        help="MPC: each compute party's host:port, in index order (repeat).")] = None,
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
    """Classify images: on a running HE server (encrypted here, evaluated there, decrypted here), or with
    --protocol mpc on the compute parties of a model-private deployment (neither the images nor the model
    revealed; only the answer is added up here)."""
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
    if protocol not in ("he", "mpc"):
        raise typer.BadParameter(f"--protocol is he or mpc, not {protocol!r}")
    if protocol == "mpc":
        if not party_target or target or compare_plain:
            raise typer.BadParameter("--protocol mpc takes --party-target once per compute party (not --target "
                                     "or --compare-plain: no party holds the model in the clear)")
        _infer_mpc(party_target, certs, party_id, server_name, transcript, x, labels, batch, connect_timeout, out)
        return
    if not target:
        raise typer.BadParameter("--protocol he needs --target host:port (the HE server)")
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
