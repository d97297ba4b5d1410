"""`securecollab serve ROLE`: start one service (mutual TLS, health checking, reflection), one sub-command a role."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from securecollab.cli.options import (CertsDir, DatasetOpt, DatasetPath, NarrowRing, Seed, Verbose, defence_options,
                                      dp_options, setup_logging, training_options, uses)
from securecollab.cli.output import console

app = typer.Typer(help="Start one service (mutual TLS, health checking, reflection); stops on SIGTERM or when its "
                       "job is done.", no_args_is_help=True)


@dataclass(frozen=True)
class Serving:
    certs: Path
    party_id: str | None
    host: str
    port: int
    port_file: Path | None
    out: Path | None
    plan_json: str | None

    def tls(self, default_id: str):
        from securecollab.net.certs import TlsFiles
        return TlsFiles.for_party(self.certs, self.party_id or default_id)

    def bind(self) -> dict:
        """The keywords every service's `serve` takes: where to listen and write."""
        return {"port": self.port, "host": self.host, "out_dir": self.out, "port_file": self.port_file}


def serving_options(
    certs: CertsDir = Path("certs"),
    party_id: Annotated[Optional[str], typer.Option(
        "--id", help="This party's id (its certificate name); default: the role (a party: party-INDEX).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "[::]",
    port: Annotated[int, typer.Option(help="Port to bind; 0 picks a free one.")] = 50051,
    port_file: Annotated[Optional[Path], typer.Option(help="Write the bound port here (for port 0).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write costs, transcript and final model here.")] = None,
    plan_json: Annotated[Optional[str], typer.Option(
        help="Full plan as JSON (overrides the plan options).")] = None,
    verbose: Verbose = True,
) -> Serving:
    """Group: what every service takes (its certificate, where it listens and writes, its plan as JSON)."""
    setup_logging(verbose)
    return Serving(certs, party_id, host, port, port_file, out, plan_json)


def secagg_options(
    compute_parties: Annotated[int, typer.Option(min=2, max=3, help="Number of compute parties.")] = 3,
    seed_compression: Annotated[bool, typer.Option(help="Expand all shares but one from PRG seeds.")] = True,
    min_clients: Annotated[int, typer.Option(min=1, help="A round needs at least this many complete clients.")] = 2,
    dp_sigma: Annotated[float, typer.Option(
        min=0.0, help="Std of distributed Gaussian noise on the aggregate (0: off).")] = 0.0,
    upload_deadline: Annotated[float, typer.Option(min=0.1, help="Seconds a round waits for uploads.")] = 120.0,
    mpc_transport: Annotated[str, typer.Option(
        help="grpc: the compute parties' MPC over mutual TLS (default). gloo: CrypTen's own plaintext world, "
             "INSECURE (a link observer sees every opened value; anyone reaching the rendezvous can join): "
             "only to compare.")] = "grpc",
    narrow_ring: NarrowRing = True,
) -> dict:
    """Group: the secure-aggregation side of the plan; gives SecAggPlan's keywords."""
    from securecollab.plans import MPC_TRANSPORTS
    if mpc_transport not in MPC_TRANSPORTS:
        raise typer.BadParameter(f"--mpc-transport is one of {MPC_TRANSPORTS}, not {mpc_transport!r}")
    return {"n_parties": compute_parties, "seed_compression": seed_compression, "min_clients": min_clients,
            "upload_deadline_s": upload_deadline, "dp_sigma": dp_sigma, "mpc_transport": mpc_transport,
            "narrow_ring": narrow_ring}


@uses(training=training_options, dp=dp_options, secagg=secagg_options, defence=defence_options)
def secagg_plan(training, dp, secagg, defence):
    """Group: every option of a secure-aggregation plan. Coordinator, parties and dealer must be given the
    same ones; gives ``plan(plan_json) -> SecAggPlan``."""
    def plan(plan_json: str | None):
        from securecollab.plans import SecAggPlan
        return SecAggPlan.from_json(plan_json) if plan_json else SecAggPlan(training=training(**dp), **secagg, **defence)
    return plan


MpcAddr = Annotated[str, typer.Option(help="gloo only: address of compute party 0's MPC rendezvous.")]
MpcPort = Annotated[int, typer.Option(help="gloo only: port of the MPC rendezvous.")]


@app.command("aggregator")
@uses(s=serving_options, training=training_options, dp=dp_options, defence=defence_options)
def aggregator(s=None, training=None, dp=None, defence=None):
    """Plain FedAvg aggregator: sees every client's update in the clear (the baseline of secure aggregation);
    a defence here is update analysis: it reads every update."""
    from securecollab.plans import FedAvgPlan
    from services.fedavg_aggregator import serve
    tls = s.tls("aggregator")
    serve(FedAvgPlan.from_json(s.plan_json) if s.plan_json else training(**dp, **defence), tls=tls, **s.bind())


@app.command("coordinator")
@uses(s=serving_options, plan=secagg_plan)
def coordinator(
    s=None,
    party_target: Annotated[Optional[list[str]], typer.Option(
        help="host:port of each compute party, in index order (repeat).")] = None,
    state: Annotated[Optional[Path], typer.Option(
        help="SQLite file of the round state (default: OUT/coordinator_state.sqlite); a coordinator started "
             "again on it resumes that training.")] = None,
    fresh: Annotated[bool, typer.Option(help="Discard a saved round state and start training anew.")] = False,
    plan=None,
):
    """Secure-aggregation coordinator: opens rounds, serves the global model, sees only the revealed sums."""
    from securecollab.errors import ProtocolError
    from services.secagg_coordinator import serve
    tls, plan = s.tls("coordinator"), plan(s.plan_json)
    if not party_target or len(party_target) != plan.n_parties:
        raise typer.BadParameter(f"give --party-target once per compute party ({plan.n_parties})")
    try:
        serve(plan, party_target, tls=tls, state=state, fresh=fresh, **s.bind())
    except ProtocolError as e:
        if e.code != "FAILED_PRECONDITION":
            raise
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None


@app.command("party")
@uses(s=serving_options, plan=secagg_plan)
def party(
    s=None,
    index: Annotated[int, typer.Option(min=0, help="This compute party's index (rank in the MPC world).")] = 0,
    mpc_peer: Annotated[Optional[list[str]], typer.Option(
        help="grpc: host:port of each compute party's MPC endpoint, in index order (repeat); this party "
             "serves its own at that port.")] = None,
    dealer: Annotated[Optional[str], typer.Option(
        help="grpc: host:port of the dealer (plans with a norm bound or --robust fltrust).")] = None,
    mpc_host: Annotated[Optional[str], typer.Option(
        help="grpc: address the MPC endpoint binds (default: --host), e.g. an address on a network only the "
             "parties and the dealer share.")] = None,
    mpc_addr: MpcAddr = "127.0.0.1", mpc_port: MpcPort = 29500,
    plan=None,
):
    """Secure-aggregation compute party: stores shares of the updates, aggregates them inside MPC."""
    from services.secagg_party import serve
    tls, spec = s.tls(f"party-{index}"), plan(s.plan_json)
    if spec.mpc_transport == "grpc" and (not mpc_peer or len(mpc_peer) != spec.n_parties):
        raise typer.BadParameter(f"give --mpc-peer once per compute party ({spec.n_parties}), in index order")
    if spec.mpc_transport == "grpc" and spec.needs_dealer and not dealer:
        raise typer.BadParameter("a norm bound needs the dealer: give --dealer host:port")
    serve(spec, index, tls=tls, mpc_addr=mpc_addr, mpc_port=mpc_port, mpc_peers=mpc_peer, dealer=dealer,
          mpc_host=mpc_host, **s.bind())


@app.command("dealer")
@uses(s=serving_options, plan=secagg_plan)
def dealer(s=None, mpc_addr: MpcAddr = "127.0.0.1", mpc_port: MpcPort = 29500, plan=None):
    """The dealer of correlated randomness (Beaver triples: for --norm-bound and --robust fltrust, and for
    `serve mpc`, which needs a dealer of its own: one serves one MPC world at a time). grpc: a mutual-TLS service on
    --port for world after world. gloo (insecure): CrypTen's trusted third party for one world; exits when
    it ends."""
    from securecollab.secagg.mpc import run_dealer
    from services.secagg_party import EXIT_REJOIN
    tls = s.tls("dealer")  # checks --id
    spec = plan(s.plan_json)
    n_parties = spec.n_parties
    if spec.mpc_transport == "grpc":
        from services.secagg_dealer import serve
        serve(n_parties, tls=tls, **s.bind())
        return
    try:
        run_dealer(n_parties, mpc_addr, mpc_port)
        console.print("dealer: the parties closed this MPC world")
    except Exception as e:  # a party dropped out
        console.print(f"dealer: the MPC world broke: {e}")
    # Each world needs its own dealer: exit so a supervisor starts one for the next world.
    raise typer.Exit(EXIT_REJOIN)


@app.command("split")
@uses(s=serving_options, training=training_options)
def split(
    s=None,
    cut: Annotated[Optional[str], typer.Option(help="Cut point (model default if unset), e.g. after_fc1.")] = None,
    split_mode: Annotated[str, typer.Option(
        help="vanilla (labels sent) or ushaped (head and labels stay on the client).")] = "vanilla",
    head_cut: Annotated[Optional[str], typer.Option(
        help="U-shaped: where the client's head starts (default: the last cut point).")] = None,
    client_weights: Annotated[str, typer.Option(
        help="handoff (client-side weights passed client to client) or per_client.")] = "handoff",
    noise_sigma: Annotated[float, typer.Option(min=0.0, help="Defence: Gaussian noise std on activations.")] = 0.0,
    nopeek: Annotated[float, typer.Option(min=0.0, help="Defence: NoPeek distance-correlation weight.")] = 0.0,
    training=None,
):
    """Split learning server: runs the layers past the cut for --clients clients taking turns, for
    rounds x local-epochs epochs."""
    from securecollab.plans import SplitPlan, split_plan_of
    from services.split_server import serve
    tls = s.tls("split")
    try:
        plan = SplitPlan.from_json(s.plan_json) if s.plan_json else split_plan_of(
            training(), cut=cut, mode=split_mode, head_cut=head_cut, client_weights=client_weights,
            noise_sigma=noise_sigma, nopeek_alpha=nopeek)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    serve(plan, tls=tls, **s.bind())


@app.command("he")
@uses(s=serving_options)
def he(
    s=None,
    model: Annotated[str, typer.Option(help="Square-activation model: convnet or mlp.")] = "convnet",
    dataset: DatasetOpt = "digits", dataset_path: DatasetPath = None, seed: Seed = 0,
    weights: Annotated[Optional[Path], typer.Option(
        help="Serve these weights (.npz from a previous --out) instead of training.")] = None,
    max_sessions: Annotated[int, typer.Option(
        min=1, help="Open sessions kept (each holds a client's keys); when full, a new one replaces the "
             "caller's own least recently used, or another party's idle for 5 min, else RESOURCE_EXHAUSTED.")] = 4,
    max_batch: Annotated[int, typer.Option(
        min=0, help="Largest batch a session may ask for (0: single queries only).")] = 4096,
):
    """Encrypted inference (CKKS): trains its square-activation model on the embedded data at start
    (HE defaults: 30 epochs, lr 0.01, or 0.003 / channels for images of 16 pixels and more; --plan-json takes
    a full HE model plan) or loads --weights."""
    from securecollab.plans import HEModelPlan, save_weights
    from securecollab.protocols.he import HEModelHost
    from services.he_server import serve
    tls = s.tls("he")
    plan = HEModelPlan.from_json(s.plan_json) if s.plan_json else HEModelPlan(
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
    if s.out:
        save_weights(net, s.out / "he_model.npz")
    host_model = HEModelHost(net, ds.input_shape, ds.num_classes, name=plan.model,
                             max_sessions=max_sessions, max_batch_size=max_batch)
    serve(host_model, tls=tls, **s.bind())


@app.command("mpc")
@uses(s=serving_options)
def mpc(
    s=None,
    index: Annotated[int, typer.Option(min=0, help="This compute party's index (rank in the MPC world).")] = 0,
    mpc_peer: Annotated[Optional[list[str]], typer.Option(
        help="host:port of each compute party's MPC endpoint, in index order (repeat); this party serves its own "
             "at that port.")] = None,
    dealer: Annotated[Optional[str], typer.Option(
        help="host:port of this deployment's own dealer (`serve dealer`; one dealer per MPC world).")] = None,
    mpc_host: Annotated[Optional[str], typer.Option(
        help="Address the MPC endpoint binds (default: --host).")] = None,
    model: Annotated[str, typer.Option(help="The public architecture: convnet or mlp (ReLU).")] = "convnet",
    output: Annotated[str, typer.Option(
        help="What a client gets: label (only the argmax, computed in MPC) or logits.")] = "label",
    compute_parties: Annotated[int, typer.Option(
        min=2, max=3, help="Number of compute parties (3: exact truncation with the dealer's help).")] = 3,
    max_batch: Annotated[int, typer.Option(min=1, max=4096, help="Most inputs in one query.")] = 512,
    state: Annotated[Optional[Path], typer.Option(
        help="Keep the model share here (mode 0600) and read it back when started again; without it a restarted "
             "party waits for the owner to upload again.")] = None,
    dataset: DatasetOpt = "digits", dataset_path: DatasetPath = None, seed: Seed = 0,
):
    """Model-private inference compute party: holds a share of the owner's model (uploaded with `securecollab
    client mpc-owner`) and of each query, evaluates the model in MPC with the other parties and its dealer, and
    answers each client with a share of the output only it can add up."""
    from securecollab.plans import MpcInferencePlan
    from services.mpc_party import serve
    tls = s.tls(f"party-{index}")
    try:
        plan = MpcInferencePlan.from_json(s.plan_json) if s.plan_json else MpcInferencePlan(
            model=model, output=output, n_parties=compute_parties, max_batch=max_batch, dataset=dataset,
            dataset_path=str(dataset_path) if dataset_path else None, seed=seed)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if not mpc_peer or len(mpc_peer) != plan.n_parties or index >= plan.n_parties:
        raise typer.BadParameter(f"give --mpc-peer once per compute party ({plan.n_parties}), in index order, and "
                                 f"an --index below {plan.n_parties}")
    if not dealer:
        raise typer.BadParameter("give --dealer host:port: the deployment's dealer of correlations")
    serve(plan, index, tls=tls, mpc_peers=mpc_peer, dealer=dealer, mpc_host=mpc_host, state_dir=state, **s.bind())
