"""Training runs (centralized, plain FedAvg, secure aggregation, split learning), each party its own process."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from securecollab.launch import ProcessGroup, ensure_certs, securecollab_cmd
from securecollab.net.testbed import LOOPBACK
from securecollab.models import load_arrays
from securecollab.plans import FedAvgPlan, split_plan_of
from securecollab.runs import register


@register("centralized")
def run_centralized(plan: FedAvgPlan, out_dir: Path, **_) -> dict:
    """All training data in one place, same model, epochs and optimizer: the baseline; own process for honest RSS."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with ProcessGroup(out_dir / "logs") as group:
        group.start("centralized", securecollab_cmd("train-centralized", "--plan-json", plan.to_json(),
                                                    "--out", str(out_dir)))
        group.wait("centralized", timeout=1800)
    return json.loads((out_dir / "result_centralized.json").read_text())


def centralized_worker(plan: FedAvgPlan, out_dir: Path) -> dict:
    from securecollab.net.costs import CostMeter
    from securecollab.training import TrainConfig, accuracy, train_local

    meter = CostMeter("centralized")
    ds = plan.load_data()
    model = plan.build_model(ds)
    cfg = TrainConfig(epochs=plan.rounds * plan.local_epochs, lr=plan.lr, batch_size=plan.batch_size,
                      momentum=plan.momentum, seed=plan.seed)
    train_local(model, ds.x_train, ds.y_train, cfg)
    costs = meter.snapshot()
    from securecollab.models import parameters_to_arrays
    np.savez(out_dir / "centralized_model.npz", **dict(parameters_to_arrays(model)))  # the released model
    result = {"accuracy": accuracy(model, ds.x_test, ds.y_test), "costs": _costs(costs, [costs])}
    (out_dir / "result_centralized.json").write_text(json.dumps(result, indent=2))
    return result


def start_aggregator(group: ProcessGroup, plan: FedAvgPlan, certs: Path, out_dir: Path) -> int:
    """The plain FedAvg aggregator as a process (on loopback, or on its host of the group's placement); returns its
    port."""
    return group.start_service("aggregator", securecollab_cmd(
        "serve", "aggregator", "--plan-json", plan.to_json(), "--certs", str(certs),
        "--host", group.placement.bind("aggregator"), "--out", str(out_dir)))


@register("fedavg")
def run_fedavg(plan: FedAvgPlan, out_dir: Path, *, malicious: dict | None = None, progress=None, **_) -> dict:
    """Plain FedAvg over gRPC (mutual TLS): an aggregator process and one process per client.
    `malicious` maps a client id to its securecollab.poisoning.Malice."""
    from securecollab.training import accuracy

    out_dir.mkdir(parents=True, exist_ok=True)
    clients = plan.client_ids()
    certs = ensure_certs(out_dir.parent / "certs", ["aggregator", *clients])
    t0 = time.perf_counter()
    with ProcessGroup(out_dir / "logs") as group:
        port = start_aggregator(group, plan, certs, out_dir)
        start_clients(group, "fedavg", clients, port, certs, out_dir, malice_args(malicious))
        wait_clients(group, clients, progress)
        group.wait("aggregator", timeout=120)
    wall = time.perf_counter() - t0
    client_costs = [json.loads((out_dir / f"result_{c}.json").read_text())["costs"] for c in clients]
    agg_costs = json.loads((out_dir / "costs_aggregator.json").read_text())
    ds = plan.load_data()
    model = plan.build_model(ds)
    with np.load(out_dir / "fedavg_model.npz", allow_pickle=False) as f:
        load_arrays(model, [(k, f[k]) for k in f.files])
    costs = _costs({"wall_s": wall}, [agg_costs, *client_costs])
    result = {"accuracy": accuracy(model, ds.x_test, ds.y_test), "costs": costs}
    (out_dir / "result_fedavg.json").write_text(json.dumps(result, indent=2))
    return result


SERVER_OF = {"fedavg": "aggregator", "secagg": "coordinator", "split": "split"}  # whom each kind of client dials


def malice_args(malicious: dict | None) -> dict[str, list[str]]:
    return {cid: ["--malice", m.to_json()] for cid, m in (malicious or {}).items()}


def start_clients(group: ProcessGroup, kind: str, clients: list[str], port: int, certs: Path, out_dir: Path,
                  extra: dict[str, list[str]] | None = None) -> None:
    """One `securecollab client <kind>` process per client, client i holding shard i."""
    server = group.placement.address(SERVER_OF[kind])
    for i, cid in enumerate(clients):
        group.start(cid, securecollab_cmd("client", kind, "--target", f"{server}:{port}", "--id", cid,
                                          "--index", str(i), "--certs", str(certs), "--out", str(out_dir),
                                          *(extra or {}).get(cid, [])))


def wait_clients(group: ProcessGroup, clients: list[str], progress=None, *, may_fail=()) -> None:
    """Wait for every client; those in `may_fail` (fault injection) only have to end."""
    for cid in clients:
        if cid in may_fail:
            group.procs[cid].wait(timeout=1800)
            continue
        group.wait(cid, timeout=1800)
        if progress:
            progress(cid)


def _costs(overall: dict, parties: list[dict]) -> dict:
    """Scorecard costs: wall of the whole run; bytes summed over clients (sent = uploads); CPU summed; RSS max."""
    clients = [p for p in parties if p.get("party", "").startswith("client")] or parties
    return {
        "wall_s": overall["wall_s"],
        "cpu_s": sum(p["cpu_s"] for p in parties),
        "bytes_sent": sum(p["bytes_sent"] for p in clients),
        "bytes_received": sum(p["bytes_received"] for p in clients),
        "peak_rss_mb": max(p["peak_rss_mb"] for p in parties),
        "parties": {p["party"]: {k: p[k] for k in ("wall_s", "cpu_s", "bytes_sent", "bytes_received",
                                                   "peak_rss_mb")} for p in parties},
    }


_HANDED_OUT: set[int] = set()
PORT_SLICE_ENV = "SECURECOLLAB_PORT_SLICE"  # "i/n": draw from the i-th of n equal parts of the range


def port_range() -> tuple[int, int]:
    """[low, high) of the ports :func:`free_port` draws from: the 12,000 below the kernel's ephemeral range,
    or the part of them that ``SECURECOLLAB_PORT_SLICE=i/n`` names (launchers that run side by side, like
    parallel test workers, each take their own part: a port one has chosen but not yet bound is then
    never the other's choice)."""
    try:
        high = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        high = 32768
    low = max(1024, high - 12000)
    part, _, parts = os.environ.get(PORT_SLICE_ENV, "").partition("/")
    if not (part.isdigit() and parts.isdigit() and int(part) < int(parts)):
        return low, high
    span = (high - low) // int(parts)
    return (low + int(part) * span, low + (int(part) + 1) * span) if span >= 100 else (low, high)


def free_port() -> int:
    """A loopback port free now, for a service started next that its peers must know in advance.

    Drawn below the kernel's ephemeral range: a port from that range (what binding port 0 gives) can be
    taken, before the service binds it, as the source port of any outgoing connection on the machine
    (seen: a compute party's MPC port taken that way, so its world never formed). Never the same port
    twice from one process."""
    import random
    import socket
    low, high = port_range()
    pick = random.SystemRandom()
    for _ in range(500):
        port = pick.randrange(low, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # nothing free below the range: fall back to the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_secagg_servers(group: ProcessGroup, spec, certs: Path, out_dir: Path,
                         coordinator_env: dict | None = None) -> int:
    """Compute parties (+ dealer when needed) and the coordinator as processes (on loopback, or each on its host of
    the group's placement); returns the coordinator's port.

    Parties and dealer are restarted when they exit asking for it (a new MPC world after a party failed).
    Every server has a fixed port, so that one restarted is where its peers look. The coordinator
    starts a fresh round state (a restart of it by hand resumes)."""
    from services.secagg_party import EXIT_REJOIN
    parties = [f"party-{i}" for i in range(spec.n_parties)]
    where = group.placement
    common = ["--plan-json", spec.to_json(), "--certs", str(certs), "--out", str(out_dir)]
    if spec.needs_dealer:
        ensure_certs(certs, ["dealer"], where)
    if spec.mpc_transport == "grpc":
        # every party's MPC endpoint and the dealer's port, fixed: a restarted one is where its peers look
        endpoints = [f"{where.address(p)}:{free_port()}" for p in parties]
        dealer = f"{where.address('dealer')}:{free_port()}" if spec.needs_dealer else ""
        mpc = [*[a for e in endpoints for a in ("--mpc-peer", e)], *(("--dealer", dealer) if dealer else ())]
        dealer_args = ["--host", where.bind("dealer"), "--port", dealer.rsplit(":", 1)[1]] if dealer else []
    else:
        mpc_port = free_port()
        mpc = dealer_args = ["--mpc-port", str(mpc_port)]
    # Parties serve only once their MPC world (and dealer) is up, so start them all before waiting.
    for i, name in enumerate(parties):
        # A fixed port: a party restarted after a failure must be where the coordinator looks.
        port_file = group.log_dir / f"{name}.port"
        port_file.unlink(missing_ok=True)
        group.start(name, securecollab_cmd(
            "serve", "party", "--index", str(i), "--host", where.bind(name), *mpc, *common,
            "--port", str(free_port()), "--port-file", str(port_file)), restart_on=(EXIT_REJOIN,))
    if spec.needs_dealer:
        group.start("dealer", securecollab_cmd("serve", "dealer", *dealer_args, *common), restart_on=(EXIT_REJOIN,))
    ports = group.wait_ports(parties, timeout=300, watch=("dealer",) if spec.needs_dealer else ())
    port_file = group.log_dir / "coordinator.port"
    port_file.unlink(missing_ok=True)
    for stale in out_dir.glob("coordinator_state.sqlite*"):  # a new run; the command itself resumes when restarted
        stale.unlink()
    group.start("coordinator", securecollab_cmd(
        "serve", "coordinator", "--host", where.bind("coordinator"), *common,
        *[a for name, p in zip(parties, ports) for a in ("--party-target", f"{where.address(name)}:{p}")],
        "--port", str(free_port()), "--port-file", str(port_file)), env=coordinator_env)
    return group.wait_port("coordinator", timeout=300)


@register("secagg")
def run_secagg(plan: FedAvgPlan, out_dir: Path, *, secagg=None, drops: dict | None = None,
               boosts: dict | None = None, malicious: dict | None = None, progress=None, **_) -> dict:
    """FedAvg over secure aggregation: coordinator, compute parties, (dealer), clients, each its own process.

    Fault injection: `drops` maps a client id to (phase, round); `boosts` to a factor on its update."""
    from securecollab.plans import SecAggPlan
    from securecollab.training import accuracy

    spec = secagg or SecAggPlan(training=plan)
    out_dir.mkdir(parents=True, exist_ok=True)
    clients = plan.client_ids()
    parties = [f"party-{i}" for i in range(spec.n_parties)]
    certs = ensure_certs(out_dir.parent / "certs", ["coordinator", *parties, "dealer", *clients])
    t0 = time.perf_counter()
    with ProcessGroup(out_dir / "logs") as group:
        port = start_secagg_servers(group, spec, certs, out_dir)
        extra = {cid: ["--drop", phase, "--drop-round", str(round_)] for cid, (phase, round_) in (drops or {}).items()}
        for cid, factor in (boosts or {}).items():
            extra.setdefault(cid, []).extend(["--boost", str(factor)])
        for cid, args in malice_args(malicious).items():
            extra.setdefault(cid, []).extend(args)
        start_clients(group, "secagg", clients, port, certs, out_dir, extra)
        wait_clients(group, clients, progress, may_fail=drops or {})
        group.wait("coordinator", timeout=300)
        wall = time.perf_counter() - t0
    party_costs = [json.loads((out_dir / f"costs_{p}.json").read_text()) for p in parties]
    client_costs = [json.loads((out_dir / f"result_{c}.json").read_text())["costs"]
                    for c in clients if (out_dir / f"result_{c}.json").exists()]
    coord_costs = json.loads((out_dir / "costs_coordinator.json").read_text())
    ds = plan.load_data()
    model = plan.build_model(ds)
    with np.load(out_dir / "secagg_model.npz", allow_pickle=False) as f:
        load_arrays(model, [(k, f[k]) for k in f.files])
    result = {"accuracy": accuracy(model, ds.x_test, ds.y_test),
              "costs": _costs({"wall_s": wall}, [coord_costs, *party_costs, *client_costs])}
    (out_dir / "result_secagg.json").write_text(json.dumps(result, indent=2))
    return result


@register("split")
def run_split(plan: FedAvgPlan, out_dir: Path, *, split=None, progress=None, placement=LOOPBACK, **_) -> dict:
    """Split learning over gRPC (mutual TLS): a server process and one process per client, in turns
    (on loopback, or each on its host of `placement`, a network profile's testbed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = split or split_plan_of(plan)
    clients = spec.client_ids()
    certs = ensure_certs(out_dir.parent / "certs", ["split", *clients], placement)
    t0 = time.perf_counter()
    with ProcessGroup(out_dir / "logs", placement) as group:
        port = group.start_service("split", securecollab_cmd(
            "serve", "split", "--plan-json", spec.to_json(), "--certs", str(certs),
            "--host", placement.bind("split"),
            "--out", str(out_dir)))
        start_clients(group, "split", clients, port, certs, out_dir)
        wait_clients(group, clients, progress)
        group.wait("split", timeout=120)
    wall = time.perf_counter() - t0
    results = [json.loads((out_dir / f"result_{c}.json").read_text()) for c in clients]
    server_costs = json.loads((out_dir / "costs_split-server.json").read_text())
    # With hand-off the last client in turn order holds the final client-side weights.
    accuracy = (results[-1]["test_accuracy"] if spec.client_weights == "handoff"
                else float(np.mean([r["test_accuracy"] for r in results])))
    result = {"accuracy": accuracy, "client_accuracies": [r["test_accuracy"] for r in results],
              "costs": _costs({"wall_s": wall}, [server_costs, *[r["costs"] for r in results]])}
    (out_dir / "result_split.json").write_text(json.dumps(result, indent=2))
    return result
