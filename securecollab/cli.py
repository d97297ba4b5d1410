"""The `securecollab` command line: demo, train, serve, client, certs."""

from __future__ import annotations

import json
import logging
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Secure collaborative learning, measured: run protocols as gRPC services, attack what each "
         "party saw, and compare costs with plain training.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
client_app = typer.Typer(help="Run one client of a protocol against running services.", no_args_is_help=True)
app.add_typer(client_app, name="client")
bench_app = typer.Typer(help="Measure a protocol's overhead against its plain counterpart (writes JSON).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")
from securecollab.attack_cli import attack_app  # noqa: E402  (its own module: the attack commands)

app.add_typer(attack_app, name="attack")
console = Console(stderr=True)


class Role(str, Enum):
    aggregator = "aggregator"
    coordinator = "coordinator"
    party = "party"
    dealer = "dealer"
    he = "he"
    split = "split"


class TrainProtocol(str, Enum):
    centralized = "centralized"
    fedavg = "fedavg"
    secagg = "secagg"
    split = "split"


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


# Options shared by every command that takes a training plan.
Model = Annotated[str, typer.Option(help="Model: mlp, cnn or convnet.")]
DatasetOpt = Annotated[str, typer.Option(help="Data set: digits, breast_cancer or npz (with --dataset-path).")]
DatasetPath = Annotated[Optional[Path], typer.Option(help="MedMNIST-style .npz file (for --dataset npz).")]
Clients = Annotated[int, typer.Option(min=1, help="Number of FL clients.")]
Rounds = Annotated[int, typer.Option(min=1, help="Federated rounds.")]
LocalEpochs = Annotated[int, typer.Option(min=1, help="Local epochs per round.")]
Lr = Annotated[float, typer.Option(min=0.0, help="SGD learning rate.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Mini-batch size.")]
Seed = Annotated[int, typer.Option(help="Seed for data split, partition, init and batch order.")]
PartitionOpt = Annotated[str, typer.Option(help="Client partition: iid or dirichlet.")]
Alpha = Annotated[float, typer.Option(min=0.0, help="Dirichlet concentration (smaller = more skewed).")]
CertsDir = Annotated[Path, typer.Option(help="Directory with ca.pem and <party>.pem/.key (see `securecollab certs`).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress to stderr.")]


DpNoise = Annotated[float, typer.Option(min=0.0, help="DP-SGD local training (opacus): noise multiplier; 0 = off. "
                                                   "Clients report their epsilon.")]
DpClip = Annotated[float, typer.Option(min=0.0, help="DP-SGD: per-example gradient clipping norm.")]


def _plan(model, dataset, dataset_path, clients, rounds, local_epochs, lr, batch_size, seed, partition, alpha,
          dp_noise=0.0, dp_clip=1.0):
    from securecollab.protocols.fedavg import FedAvgPlan
    try:
        return FedAvgPlan(model=model, dataset=dataset, dataset_path=str(dataset_path) if dataset_path else None,
                          num_clients=clients, rounds=rounds, local_epochs=local_epochs, lr=lr,
                          batch_size=batch_size, seed=seed, partition=partition, alpha=alpha,
                          dp_noise_multiplier=dp_noise, dp_max_grad_norm=dp_clip)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


@app.command()
def demo(
    quick: Annotated[bool, typer.Option(help="Fewer rounds (5 instead of 10) and the attack experiments' quick "
                                             "settings (fewer runs, images, shadow models): minutes, not an hour.")] = False,
    out: Annotated[Path, typer.Option(help="Where scorecard.json/.md and figures are written.")] = Path("results"),
    model: Model = "mlp", clients: Clients = 4, seed: Seed = 0,
    attacks: Annotated[str, typer.Option(help="Attack experiments to run: all, none, or names separated by commas "
                                              "(see `securecollab attack list`).")] = "all",
):
    """Run every protocol on the embedded digits data, attack what each party received, print the scorecard."""
    from securecollab.protocols.fedavg import FedAvgPlan
    from securecollab.runs import run_protocol
    from securecollab.scorecard import HEADERS, build_scorecard, rows, write_scorecard

    chosen = _chosen_experiments(attacks)  # a typo fails now, not after the protocols ran
    plan = FedAvgPlan(model=model, num_clients=clients, seed=seed, **({"rounds": 5} if quick else {}))
    results = {}
    steps = [("centralized", "centralized training (baseline)"),
             ("fedavg", f"plain FedAvg over gRPC: {clients} client processes, {plan.rounds} rounds"),
             ("secagg", f"FedAvg over secure aggregation: 3 CrypTen compute parties, {clients} clients"),
             ("split", f"split learning over gRPC: server + {clients} client processes in turns"),
             ("he_inference", "encrypted inference (CKKS): HE server process, the test set encrypted")]
    for name, label in steps:
        with console.status(f"[bold]{label}[/bold] ..."):
            results[name] = run_protocol(name, plan, out / "runs" / name)
        console.print(f"[green]done[/green] {label}: accuracy {results[name]['accuracy']:.3f}, "
                      f"{results[name]['costs']['wall_s']:.1f}s")
    _print_he_examples(results["he_inference"])
    attack_rows, failed = _demo_attacks(out, quick, seed, {name: out / "runs" / name for name in results},
                                        chosen)
    card = build_scorecard(results, plan=json.loads(plan.to_json()), attacks=attack_rows)
    if failed:
        card["attack_errors"] = failed
    paths = write_scorecard(card, out)
    table = Table(title=f"securecollab scorecard: {plan.dataset} / {plan.model} (baseline in brackets)")
    for h in HEADERS:
        table.add_column(h)
    for r in rows(card):
        table.add_row(*r)
    out_console = Console()
    if not out_console.is_terminal:
        out_console = Console(width=130)  # piped or logged: don't squeeze the table to 80 columns
    out_console.print(table)
    if attack_rows:
        from securecollab.attack_cli import attack_table
        out_console.print(attack_table(attack_rows, "what each adversary learned (baseline: no transcript)"))
    console.print("wrote " + ", ".join(str(p) for p in paths))
    if failed:
        console.print(f"[red]attack experiments failed:[/red] {', '.join(f['experiment'] for f in failed)} "
                      "(see scorecard.json attack_errors)")
        raise typer.Exit(1)


# The scorecard reads from training-time leakage to inference-time leakage.
DEMO_ORDER = ("gradient_inversion", "split_attacks", "membership", "extraction", "dp")


def _chosen_experiments(spec: str) -> list[str]:
    """`all`, `none` or a comma list, checked against the registry before any protocol runs long."""
    from attacks.registry import EXPERIMENTS, discover
    discover()
    order = [n for n in DEMO_ORDER if n in EXPERIMENTS] + sorted(set(EXPERIMENTS) - set(DEMO_ORDER))
    if spec.strip() == "all":
        return order
    if spec.strip() == "none":
        return []
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise typer.BadParameter(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(order)}, "
                                 "all or none", param_hint="--attacks")
    return [n for n in order if n in names]


def _demo_attacks(out: Path, quick: bool, seed: int, runs: dict[str, Path],
                  chosen: list[str]) -> tuple[list[dict], list[dict]]:
    """The chosen experiments, in the scorecard's order; figures' paths made relative to `out`."""
    import traceback

    from attacks.registry import EXPERIMENTS, run_experiment
    rows, failed = [], []
    for name in chosen:
        exp = EXPERIMENTS[name]
        target = out / "attacks" / name
        minutes = exp.minutes[0 if quick else 1]
        with console.status(f"[bold]attack experiment {name}[/bold] (~{minutes:g} min) ...") as status:
            def progress(msg: str, name=name, status=status) -> None:
                status.update(f"[bold]attack experiment {name}[/bold]: {msg}")
            try:
                got = run_experiment(name, target, quick=quick, seed=seed, progress=progress, runs=runs)
            except Exception as e:  # one failed experiment must not lose the others' results
                console.print(f"[red]failed[/red] {name}: {e}")
                failed.append({"experiment": name, "error": f"{type(e).__name__}: {e}",
                               "traceback": traceback.format_exc(limit=5)})
                continue
        for r in got:
            if r.get("figure"):
                r["figure"] = str((target / r["figure"]).relative_to(out))
        rows += got
        console.print(f"[green]done[/green] attack experiment {name}: {len(got)} rows")
    return rows, failed


def _print_he_examples(result: dict) -> None:
    m = result["metrics"]
    table = Table(title=f"encrypted inference ({m['model']}, x^2 activations): decrypted vs plaintext, one query each")
    for h in ["test image", "label", "plaintext", "decrypted", "max |logit error|"]:
        table.add_column(h)
    for e in result["examples"]:
        table.add_row(str(e["index"]), str(e["label"]), str(e["plaintext"]), str(e["decrypted"]),
                      f"{e['max_abs_logit_error']:.1e}")
    Console().print(table)
    console.print(f"whole test set, batched: argmax agreement {m['batched_argmax_agreement']:.3f}, max |logit error| "
                  f"{m['batched_max_abs_logit_error']:.1e}; one query {m['single_latency_s']:.2f}s, "
                  f"session keys {m['session_key_bytes'] / 1e6:.1f} MB")


@app.command()
def train(
    protocol: Annotated[TrainProtocol, typer.Option(help="Which protocol trains the model.")] = TrainProtocol.fedavg,
    out: Annotated[Path, typer.Option(help="Output directory (results, costs, transcripts).")] = Path("results/train"),
    model: Model = "mlp", dataset: DatasetOpt = "digits", dataset_path: DatasetPath = None,
    clients: Clients = 4, rounds: Rounds = 10, local_epochs: LocalEpochs = 3, lr: Lr = 0.1,
    batch_size: BatchSize = 32, seed: Seed = 0, partition: PartitionOpt = "iid", alpha: Alpha = 0.5,
    dp_noise: DpNoise = 0.0, dp_clip: DpClip = 1.0,
):
    """Train with one protocol (all parties as local processes) and print accuracy and costs."""
    from securecollab.runs import run_protocol
    plan = _plan(model, dataset, dataset_path, clients, rounds, local_epochs, lr, batch_size, seed, partition, alpha,
                 dp_noise, dp_clip)
    if plan.dp and protocol.value not in ("fedavg", "secagg"):
        raise typer.BadParameter("DP-SGD local training is for fedavg and secagg clients", param_hint="--dp-noise")
    with console.status(f"training with {protocol.value} ..."):
        result = run_protocol(protocol.value, plan, out)
    typer.echo(json.dumps(result, indent=2))


@app.command("train-centralized", hidden=True)
def train_centralized(plan_json: Annotated[str, typer.Option()], out: Annotated[Path, typer.Option()]):
    """Worker for the centralized baseline (run in its own process so its costs are its own)."""
    from securecollab.protocols.fedavg import FedAvgPlan
    from securecollab.runs import centralized_worker
    centralized_worker(FedAvgPlan.from_json(plan_json), out)


@app.command()
def serve(
    role: Annotated[Role, typer.Argument(help="Which service to run.")],
    certs: CertsDir = Path("certs"),
    party_id: Annotated[Optional[str], typer.Option("--id", help="This party's id (its certificate name); default: the role.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "[::]",
    port: Annotated[int, typer.Option(help="Port to bind; 0 picks a free one.")] = 50051,
    port_file: Annotated[Optional[Path], typer.Option(help="Write the bound port here (for port 0).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write costs, transcript and final model here.")] = None,
    plan_json: Annotated[Optional[str], typer.Option(help="Full training plan as JSON (overrides the options below).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model: mlp, cnn or convnet (default: convnet for he, else mlp).")] = None,
    dataset: DatasetOpt = "digits", dataset_path: DatasetPath = None,
    clients: Clients = 4, rounds: Rounds = 10, local_epochs: LocalEpochs = 3, lr: Lr = 0.1,
    batch_size: BatchSize = 32, seed: Seed = 0, partition: PartitionOpt = "iid", alpha: Alpha = 0.5,
    cut: Annotated[Optional[str], typer.Option(help="split: cut point (model default if unset), e.g. after_fc1.")] = None,
    split_mode: Annotated[str, typer.Option(help="split: vanilla (labels sent) or ushaped (head and labels stay on the client).")] = "vanilla",
    head_cut: Annotated[Optional[str], typer.Option(help="split, U-shaped: where the client's head starts (default: the last cut point).")] = None,
    client_weights: Annotated[str, typer.Option(help="split: handoff (client-side weights passed client to client) or per_client.")] = "handoff",
    noise_sigma: Annotated[float, typer.Option(min=0.0, help="split defence: Gaussian noise std on activations.")] = 0.0,
    nopeek: Annotated[float, typer.Option(min=0.0, help="split defence: NoPeek distance-correlation weight.")] = 0.0,
    weights: Annotated[Optional[Path], typer.Option(help="he: serve these weights (.npz from a previous --out) instead of training.")] = None,
    max_sessions: Annotated[int, typer.Option(min=1, help="he: open sessions kept (each holds a client's keys); the least recently used is dropped.")] = 4,
    max_batch: Annotated[int, typer.Option(min=0, help="he: largest batch a session may ask for (0: single queries only).")] = 4096,
    index: Annotated[int, typer.Option(min=0, help="party: this compute party's index (rank in the MPC world).")] = 0,
    party_target: Annotated[Optional[list[str]], typer.Option(help="coordinator: host:port of each compute party, in index order (repeat).")] = None,
    mpc_addr: Annotated[str, typer.Option(help="party/dealer: address of compute party 0's MPC rendezvous (CrypTen, gloo).")] = "127.0.0.1",
    mpc_port: Annotated[int, typer.Option(help="party/dealer: port of the MPC rendezvous.")] = 29500,
    compute_parties: Annotated[int, typer.Option(min=2, max=3, help="Number of compute parties.")] = 3,
    seed_compression: Annotated[bool, typer.Option(help="Expand all shares but one from PRG seeds.")] = True,
    min_clients: Annotated[int, typer.Option(min=1, help="A round needs at least this many complete clients.")] = 2,
    norm_bound: Annotated[float, typer.Option(min=0.0, help="Reject updates with a larger L2 norm, inside MPC (0: off).")] = 0.0,
    dp_sigma: Annotated[float, typer.Option(min=0.0, help="Std of distributed Gaussian noise on the aggregate (0: off).")] = 0.0,
    upload_deadline: Annotated[float, typer.Option(min=0.1, help="Seconds a round waits for uploads.")] = 120.0,
    state: Annotated[Optional[Path], typer.Option(help="coordinator: SQLite file of the round state (default: OUT/coordinator_state.sqlite); a coordinator started again on it resumes that training.")] = None,
    fresh: Annotated[bool, typer.Option(help="coordinator: discard a saved round state and start training anew.")] = False,
    dp_noise: DpNoise = 0.0, dp_clip: DpClip = 1.0,
    verbose: Verbose = True,
):
    """Start one service (mutual TLS, health checking, reflection); stops on SIGTERM or when its job is done.

    `he` serves encrypted inference: it trains its square-activation model on the embedded data at start
    (HE defaults: 30 epochs, lr 0.01; --plan-json takes a full HE model plan) or loads --weights.
    `split` runs the layers past the cut for --clients clients taking turns, for rounds x local-epochs epochs.
    """
    from securecollab.certs import TlsFiles
    from securecollab.protocols.fedavg import FedAvgPlan
    from securecollab.protocols.secagg import SecAggPlan
    _logging(verbose)
    default_id = f"party-{index}" if role is Role.party else role.value
    tls = TlsFiles.for_party(certs, party_id or default_id)
    if role is Role.he:
        _serve_he(tls, model or "convnet", dataset, dataset_path, seed, plan_json, weights, max_sessions, max_batch,
                  host, port, port_file, out)
        return
    model = model or "mlp"
    if role is Role.split:
        from securecollab.protocols.split import SplitPlan
        from securecollab.runs import split_plan_of
        from services.split_server import serve as serve_split
        try:
            plan = SplitPlan.from_json(plan_json) if plan_json else split_plan_of(
                _plan(model, dataset, dataset_path, clients, rounds, local_epochs, lr, batch_size, seed, partition,
                      alpha), cut=cut, mode=split_mode, head_cut=head_cut, client_weights=client_weights, noise_sigma=noise_sigma,
                nopeek_alpha=nopeek)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        serve_split(plan, tls=tls, port=port, host=host, out_dir=out, port_file=port_file)
        return
    training = _plan(model, dataset, dataset_path, clients, rounds, local_epochs, lr, batch_size, seed, partition, alpha,
                     dp_noise, dp_clip)
    if role is Role.aggregator:
        from services.fedavg_aggregator import serve as serve_aggregator
        plan = FedAvgPlan.from_json(plan_json) if plan_json else training
        serve_aggregator(plan, tls=tls, port=port, host=host, out_dir=out, port_file=port_file)
        return
    plan = SecAggPlan.from_json(plan_json) if plan_json else SecAggPlan(
        training=training, n_parties=compute_parties, seed_compression=seed_compression,
        min_clients=min_clients, upload_deadline_s=upload_deadline, norm_bound=norm_bound, dp_sigma=dp_sigma)
    if role is Role.coordinator:
        from services.secagg_coordinator import serve as serve_coordinator
        if not party_target or len(party_target) != plan.n_parties:
            raise typer.BadParameter(f"give --party-target once per compute party ({plan.n_parties})")
        from securecollab.protocols import ProtocolError
        try:
            serve_coordinator(plan, party_target, tls=tls, port=port, host=host, out_dir=out, port_file=port_file,
                              state=state, fresh=fresh)
        except ProtocolError as e:
            if e.code != "FAILED_PRECONDITION":
                raise
            console.print(f"[red]error:[/] {e}")
            raise typer.Exit(2) from None
    elif role is Role.party:
        from services.secagg_party import serve as serve_party
        serve_party(plan, index, tls=tls, mpc_addr=mpc_addr, mpc_port=mpc_port, port=port, host=host,
                    out_dir=out, port_file=port_file)
    elif role is Role.dealer:
        from securecollab.mpc import run_dealer
        from services.secagg_party import EXIT_REJOIN
        try:
            run_dealer(plan.n_parties, mpc_addr, mpc_port)
            console.print("dealer: the parties closed this MPC world")
        except Exception as e:  # a party dropped out
            console.print(f"dealer: the MPC world broke: {e}")
        # Each world needs its own dealer: exit so a supervisor starts one for the next world.
        raise typer.Exit(EXIT_REJOIN)


def _serve_he(tls, model, dataset, dataset_path, seed, plan_json, weights, max_sessions, max_batch,
              host, port, port_file, out):
    from securecollab.protocols.he import HEModelHost, HEModelPlan, save_weights
    from services.he_server import serve as serve_he
    plan = HEModelPlan.from_json(plan_json) if plan_json else HEModelPlan(
        model=model, dataset=dataset, dataset_path=str(dataset_path) if dataset_path else None, seed=seed)
    try:
        if weights:
            net, ds = plan.load(weights)
        else:
            logging.getLogger("securecollab.he").info(
                "training %s (%s activations) on %s: %d epochs", plan.model, plan.activation, plan.dataset, plan.epochs)
            net, ds = plan.train()
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if out:
        save_weights(net, out / "he_model.npz")
    host_model = HEModelHost(net, ds.input_shape, ds.num_classes, name=plan.model,
                             max_sessions=max_sessions, max_batch_size=max_batch)
    serve_he(host_model, tls=tls, port=port, host=host, out_dir=out, port_file=port_file)


def _run_infer(target, certs, party_id, server_name, transcript, x, batch, connect_timeout, compare_plain=False):
    import numpy as np
    from securecollab.certs import TlsFiles
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
    server_name: Annotated[Optional[str], typer.Option(help="Name expected in the server certificate.")] = None,
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
    _logging(verbose)
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
    table = Table(title=f"encrypted inference: {client.description.model}")
    for h in ["#", "label", "prediction", "top logit"]:
        table.add_column(h)
    for i, row in enumerate(logits):
        table.add_row(str(i), "-" if labels is None else str(labels[i]), str(int(row.argmax())), f"{row.max():.3f}")
    Console().print(table)
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
        out.mkdir(parents=True, exist_ok=True)
        (out / f"infer_{party_id}.json").write_text(json.dumps(result, indent=2))


def _train_client(run_client, target, party_id, index, certs, server_name, out, verbose, **options):
    """Run one protocol client with its certificate and print its summary line."""
    from securecollab.certs import TlsFiles
    _logging(verbose)
    result = run_client(target, party_id, index, tls=TlsFiles.for_party(certs, party_id), server_name=server_name,
                        out_dir=out, **options)
    typer.echo(json.dumps({k: result[k] for k in ("client_id", "num_examples", "test_accuracy")}))


@client_app.command("fedavg")
def client_fedavg(
    target: Annotated[str, typer.Option(help="Aggregator address host:port.")],
    party_id: Annotated[str, typer.Option("--id", help="Client id, e.g. client-0 (must match its certificate).")],
    index: Annotated[int, typer.Option(min=0, help="Which data shard this client holds.")],
    certs: CertsDir = Path("certs"),
    server_name: Annotated[Optional[str], typer.Option(help="Name expected in the server certificate, if not the target host.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write result, costs and transcript here.")] = None,
    verbose: Verbose = False,
):
    """Take part in plain FedAvg rounds until the aggregator says training is done."""
    from services.fedavg_client import run_client
    _train_client(run_client, target, party_id, index, certs, server_name, out, verbose)


@client_app.command("split")
def client_split(
    target: Annotated[str, typer.Option(help="Split server address host:port.")],
    party_id: Annotated[str, typer.Option("--id", help="Client id, e.g. client-0 (must match its certificate).")],
    index: Annotated[int, typer.Option(min=0, help="Which data shard this client holds.")],
    certs: CertsDir = Path("certs"),
    server_name: Annotated[Optional[str], typer.Option(help="Name expected in the server certificate.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write result, costs, transcript and client-side weights here.")] = None,
    verbose: Verbose = False,
):
    """Train the layers up to the cut (and the head, U-shaped) on this client's data; only activations leave."""
    from services.split_client import run_client
    _train_client(run_client, target, party_id, index, certs, server_name, out, verbose)


@client_app.command("secagg")
def client_secagg(
    target: Annotated[str, typer.Option(help="Coordinator address host:port.")],
    party_id: Annotated[str, typer.Option("--id", help="Client id, e.g. client-0 (must match its certificate).")],
    index: Annotated[int, typer.Option(min=0, help="Which data shard this client holds.")],
    certs: CertsDir = Path("certs"),
    server_name: Annotated[Optional[str], typer.Option(help="Name expected in the coordinator's certificate.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write result, costs and transcript here.")] = None,
    drop: Annotated[Optional[str], typer.Option(help="Fault injection: vanish at before_upload, mid_upload, partial_upload or after_upload.")] = None,
    drop_round: Annotated[int, typer.Option(help="Round in which --drop happens.")] = 0,
    boost: Annotated[float, typer.Option(help="Fault injection: multiply this client's update (a malicious client).")] = 1.0,
    verbose: Verbose = False,
):
    """Take part in FedAvg over secure aggregation: each round's update leaves only as secret shares."""
    from services.secagg_client import DROP_PHASES, run_client
    if drop and drop not in DROP_PHASES:
        raise typer.BadParameter(f"--drop must be one of {DROP_PHASES}")
    _train_client(run_client, target, party_id, index, certs, server_name, out, verbose,
                  drop=drop, drop_round=drop_round, boost=boost)


@bench_app.command("secagg")
def bench_secagg_cmd(
    clients: Annotated[int, typer.Option(min=2, help="K: clients, each with a ready update.")] = 10,
    params: Annotated[int, typer.Option(min=1, help="D: floats per update.")] = 1_000_000,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds measured (their median is reported).")] = 5,
    warmup: Annotated[int, typer.Option(min=0, help="Rounds run first and left out of the median (kept in the JSON).")] = 2,
    compute_parties: Annotated[int, typer.Option(min=2, max=3, help="Number of compute parties.")] = 3,
    seed_compression: Annotated[bool, typer.Option(help="Expand all shares but one from PRG seeds.")] = True,
    norm_bound: Annotated[float, typer.Option(min=0.0, help="Also bound update norms inside MPC (needs the dealer).")] = 0.0,
    out: Annotated[Path, typer.Option(help="JSON result file.")] = Path("results/bench_secagg.json"),
):
    """Aggregation rounds only, plain aggregator vs secure aggregation, mutual TLS in both, on loopback."""
    import tempfile
    from securecollab.bench import bench_secagg
    with tempfile.TemporaryDirectory(prefix="bench-secagg-") as work:
        result = bench_secagg(clients, params, rounds=rounds, warmup=warmup, parties=compute_parties,
                              seed_compression=seed_compression, norm_bound=norm_bound, work_dir=Path(work),
                              log=lambda m: console.print(m))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    table = Table(title=f"secure aggregation overhead: K={clients}, D={params:,}")
    for h in ["", "round wall s (median)", "upload bytes / client"]:
        table.add_column(h)
    for name in ("plain", "secure"):
        table.add_row(name, f"{result[name]['round_wall_s']:.3f}", f"{result[name]['upload_bytes_per_client']:,.0f}")
    table.add_row("ratio", f"{result['ratio']['round_wall']:.2f}", f"{result['ratio']['upload_bytes']:.3f}")
    Console().print(table)
    console.print(f"max |revealed - plaintext aggregate| = {result['max_abs_error']:.2e}; wrote {out}")


@bench_app.command("load")
def bench_load_cmd(
    protocol: Annotated[str, typer.Option(help="What to load: secagg (coordinator + 3 compute parties), he (one HE inference server) or both.")] = "secagg",
    clients: Annotated[int, typer.Option(min=2, help="secagg: concurrent clients (threads here, each with its own certificate).")] = 100,
    rounds: Annotated[int, typer.Option(min=1, help="secagg: rounds.")] = 3,
    out: Annotated[Path, typer.Option(help="secagg: JSON result file.")] = Path("results/bench_load.json"),
    he_clients: Annotated[int, typer.Option(min=1, help="he: concurrent clients (threads here, each with its own certificate, keys and session). Memory grows with it: at 50, ~7 GB in the server and ~7 GB here.")] = 50,
    he_queries: Annotated[int, typer.Option(min=1, help="he: encrypted single-image queries per client, sent once every session is open.")] = 4,
    he_out: Annotated[Path, typer.Option(help="he: JSON result file.")] = Path("results/bench_load_he.json"),
):
    """Many concurrent clients: against the coordinator and 3 compute parties (round times, throughput, peak RSS,
    errors), and/or against one HE server (queries/s, latency, session set-up, every answer checked, peak RSS)."""
    if protocol not in ("secagg", "he", "both"):
        raise typer.BadParameter(f"--protocol must be secagg, he or both, not {protocol!r}")
    from securecollab.bench_load import bench_he_load, bench_secagg_load
    failed = False
    if protocol in ("secagg", "both"):
        result = bench_secagg_load(clients, rounds, out, log=console.print)
        console.print(f"wrote {out}")
        failed = bool(result["errors"])
    if protocol in ("he", "both"):
        r = bench_he_load(he_clients, he_queries, he_out, log=console.print)
        ss, lat = r["session_setup_s"], r["latency_s"]

        def p(d: dict, unit: str = " s") -> str:
            return "-" if d["p50"] is None else f"{d['p50']:.2f}{unit} / {d['p95']:.2f}{unit}"

        table = Table(title=f"HE inference under load: {r['clients']} concurrent clients x "
                            f"{r['queries_per_client']} encrypted queries ({r['model']} on {r['dataset']}, mutual TLS)")
        table.add_column("")
        table.add_column("value")
        table.add_row("answers correct / sent", f"{r['answers_correct']} / {r['queries']}")
        table.add_row("errors", str(len(r["errors"])))
        table.add_row("throughput (concurrent phase)", f"{r['queries_per_s']:.2f} queries/s over "
                                                       f"{r['concurrent_wall_s']:.1f} s")
        table.add_row("latency per query p50 / p95", p(lat))
        table.add_row("session set-up (keygen + upload) p50 / p95", p(ss["keygen_plus_upload"]))
        table.add_row("  of which keygen p50 / p95", p(ss["keygen"]))
        table.add_row("  server set-up p50 / p95", p(ss["server_setup"]))
        if r["bytes_per_query"]:
            table.add_row("bytes per query (up + down)", f"{r['bytes_per_query']:,.0f}")
        if r["session_key_bytes"]:
            table.add_row("session keys per client", f"{r['session_key_bytes'] / 1e6:.1f} MB")
        rss = r["rss_mb"]
        table.add_row("peak RSS server", "-" if r["peak_rss_mb"]["server"] is None else
                      f"{r['peak_rss_mb']['server']:,.0f} MB (idle {rss['server_idle']:,.0f} MB)")
        table.add_row("peak RSS clients (this process)", f"{r['peak_rss_mb']['clients (this process)']:,.0f} MB "
                                                         f"(before the clients {rss['clients_before_start']:,.0f} MB)")
        cores = r["cpu_cores_used_concurrent"]
        if cores["server"] is not None:
            table.add_row("CPU cores used, concurrent phase", f"server {cores['server']:.2f}, "
                                                              f"clients {cores['clients']:.2f}")
        Console().print(table)
        for e in r["errors"][:10]:
            console.print(f"error: {e}")
        console.print(f"wrote {he_out}")
        failed = failed or bool(r["errors"]) or r["answers_correct"] != r["queries"]
    if failed:
        raise typer.Exit(1)


@bench_app.command("split")
def bench_split_cmd(
    model: Annotated[str, typer.Option(help="Model: mlp, cnn or convnet.")] = "cnn",
    cut: Annotated[Optional[str], typer.Option(help="Cut point (model default if unset).")] = None,
    mode: Annotated[str, typer.Option(help="vanilla or ushaped.")] = "vanilla",
    clients: Annotated[int, typer.Option(min=1, help="Client processes taking turns (hand-off between them).")] = 1,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs timed (median reported).")] = 5,
    batch_size: BatchSize = 32, seed: Seed = 0,
    out: Annotated[Path, typer.Option(help="JSON result file.")] = Path("results/bench_split.json"),
):
    """One epoch of split learning across processes vs one epoch of centralized training; bytes vs payload."""
    import tempfile
    from securecollab.bench_split import bench_split
    from securecollab.protocols.split import SplitPlan
    try:
        plan = SplitPlan(model=model, cut=cut, mode=mode, num_clients=clients, epochs=epochs, batch_size=batch_size,
                         seed=seed)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    with tempfile.TemporaryDirectory(prefix="bench-split-") as work:
        r = bench_split(plan, work_dir=Path(work), log=lambda m: console.print(m))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2))
    c, s_ = r["centralized"], r["split"]
    table = Table(title=f"split learning overhead: {model}, {mode}, {clients} client(s), batch {batch_size}")
    for h in ["", "epoch wall s (median)", "accuracy", "bytes / epoch"]:
        table.add_column(h)
    table.add_row("centralized", f"{c['epoch_wall_s']:.3f}", f"{c['accuracy']:.3f}", "-")
    table.add_row("split", f"{s_['epoch_wall_s']:.3f}", f"{s_['accuracy']:.3f}", f"{s_['bytes_per_epoch']:,.0f}")
    Console().print(table)
    console.print(f"ratio.epoch_wall {r['ratio']['epoch_wall']:.2f}; bytes / raw activations+gradients(+labels) "
                  f"{s_['bytes_ratio_to_payload']:.4f} (hand-off {s_['handoff_bytes_per_epoch']:,.0f} B/epoch); wrote {out}")


@bench_app.command("he")
def bench_he_cmd(
    model: Annotated[str, typer.Option(help="Square-activation model served: convnet or mlp.")] = "convnet",
    queries: Annotated[int, typer.Option(min=0, help="Single encrypted queries: the first N test images (0: all).")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batched query (4096 fills every slot).")] = 4096,
    batch_rounds: Annotated[int, typer.Option(min=1, help="Batches timed (median reported).")] = 2,
    seed: Seed = 0,
    out: Annotated[Path, typer.Option(help="JSON result file.")] = Path("results/bench_he.json"),
):
    """Encrypted inference (CKKS) vs plain inference: one-query latency, batched throughput, bytes, exactness."""
    import tempfile
    from securecollab.inference import bench_he
    from securecollab.protocols.he import HEModelPlan
    with tempfile.TemporaryDirectory(prefix="bench-he-") as work:
        r = bench_he(HEModelPlan(model=model, seed=seed), queries=queries, batch_size=batch_size,
                     batch_rounds=batch_rounds, work_dir=Path(work), log=lambda m: console.print(m))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2))
    he, st = r["he"], r["he"]["single"]["stages_s"]
    table = Table(title=f"HE inference: {model} on {r['dataset']} ({r['single_queries']} single queries, "
                        f"batches of {batch_size})")
    for h in ["", "latency s (1 query)", "bytes / query", "throughput img/s"]:
        table.add_column(h)
    table.add_row("plain", f"{r['plain']['latency_s']:.4f}", f"{r['plain']['query_bytes']:,.0f}", "-")
    table.add_row("HE (CKKS)", f"{he['latency_s']:.3f}", f"{he['query_bytes']:,.0f}", f"{he['throughput_per_s']:.0f}")
    Console().print(table)
    console.print(f"stages per query: keygen {st['keygen']:.2f}s (once per session), encrypt {st['encrypt']:.4f}s, "
                  f"network+server {st['network_and_server']:.3f}s (server {st['server']:.3f}s), "
                  f"decrypt {st['decrypt']:.4f}s; session keys {he['session_key_bytes'] / 1e6:.1f} MB")
    console.print(f"argmax agreement {he['argmax_agreement']:.4f}, max |logit error| {he['max_abs_logit_error']:.2e} "
                  f"over the whole test set; accuracy plaintext {r['plaintext_accuracy']:.3f}, "
                  f"HE {r['he_accuracy']:.3f}")
    for name, acc in r["plaintext_accuracy_by_activation"].items():
        console.print(f"plaintext accuracy {name}: x^2 {acc['square']:.3f} vs ReLU {acc['relu']:.3f}")
    console.print(f"wrote {out}")


@app.command()
def health(
    target: Annotated[str, typer.Option(help="Server address host:port.")] = "localhost:50051",
    certs: CertsDir = Path("certs"),
    party_id: Annotated[str, typer.Option("--id", help="Whose certificate to present (any issued by the project CA).")] = "coordinator",
    server_name: Annotated[Optional[str], typer.Option(help="Name expected in the server certificate (default: the target host).")] = None,
    service: Annotated[str, typer.Option(help="Service to ask about ('' = the whole server).")] = "",
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for an answer.")] = 5.0,
):
    """Ask a server's gRPC health service over mutual TLS; exit 0 only if it answers SERVING.

    For container health checks and Kubernetes exec probes (their built-in gRPC probes cannot do mTLS)."""
    import grpc

    from securecollab.certs import TlsFiles
    from securecollab.transport import check_health, make_channel
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
    from securecollab.certs import make_certs
    try:
        paths = make_certs(out, parties, hosts=host or ())
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    for p in paths:
        typer.echo(str(p))
