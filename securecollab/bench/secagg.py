"""Overhead benchmarks: a secure protocol against its plain counterpart on the same loopback setup.

Servers and clients are separate processes (clients start each round together
at a barrier), so no client's work is serialized behind another's in one
interpreter; on a 2-core machine they still share the CPU with the servers.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import statistics
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from securecollab.aggregation import secure_rule
from securecollab.launch import ProcessGroup, ensure_certs
from securecollab.net.certs import TlsFiles
from securecollab.net.costs import CostMeter, method_bytes
from securecollab.net.testbed import PROFILES, Placement, latency_model, network_description, testbed_or_loopback
from securecollab.net.transport import make_channel, wait_ready
from securecollab.plans import FedAvgPlan, SecAggPlan
from securecollab.runs.training import start_aggregator, start_secagg_servers
from securecollab.transcript import Kind, load_transcript
from securecollab.updates import ready_update


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a benchmark's parties run: the hosts (`placement`), and how many processes the clients share
    (0: one process each, as separate hosts would be; k: threads spread over k processes, loopback only)."""

    placement: Placement
    client_processes: int = 0


def _run_clients(n: int, rounds: int, layout: Layout, body, *args) -> tuple[list[float], list[dict]]:
    """Run `body(i, barrier, starts, meter, placement, *args)` for n clients, laid out as `layout` says.

    Returns each round's first upload time and every client's cost snapshot."""
    placement = layout.placement
    processes = min(layout.client_processes or n, n)
    ctx = mp.get_context("spawn")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the spawned clients
    barrier, starts, results = ctx.Barrier(n), ctx.Array("d", [float("inf")] * rounds), ctx.Queue()
    procs = [ctx.Process(target=_clients_main, args=(body, list(range(k, n, processes)), barrier, starts, results,
                                                     placement, *args))
             for k in range(processes)]
    for p in procs:
        p.start()
    try:
        out = [results.get(timeout=1800) for _ in range(n)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [o for o in out if isinstance(o, str)]
    if errors:
        raise RuntimeError(f"bench client failed: {errors[0]}")
    return list(starts), out


def _clients_main(body, ids, barrier, starts, results, placement, *args):
    if len(ids) == 1:
        placement.enter(f"client-{ids[0]}")  # before any socket: every thread made from here on is on that host
        _client_main(body, ids[0], barrier, starts, results, placement, *args)
        return
    threads = [threading.Thread(target=_client_main, args=(body, i, barrier, starts, results, placement, *args))
               for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _client_main(body, i, barrier, starts, results, placement, *args):
    meter = CostMeter(f"client-{i}")
    try:
        body(i, barrier, starts, meter, placement, *args)
        results.put(meter.snapshot())
    except BaseException as e:  # reported to the parent, which stops the benchmark
        barrier.abort()
        results.put(f"client-{i}: {type(e).__name__}: {e} (at {traceback.extract_tb(e.__traceback__)[-1].line})")


def _mark_start(starts, r: int) -> None:
    with starts.get_lock():
        starts[r] = min(starts[r], time.time())


def _plain_client(i, barrier, starts, meter, placement, port, certs, params, rounds, seed):
    from securecollab.generated.v1 import fedavg_pb2 as pb
    from securecollab.generated.v1 import fedavg_pb2_grpc as pb_grpc
    from securecollab.net.wire import encode_named

    cid, update = f"client-{i}", ready_update(i, params, seed)
    with make_channel(f"{placement.address('aggregator')}:{port}", tls=TlsFiles.for_party(certs, cid),
                      meter=meter) as ch:
        wait_ready(ch)
        stub = pb_grpc.FedAvgAggregatorStub(ch)
        stub.Join(pb.JoinRequest(client_id=cid), timeout=60)
        for r in range(rounds):
            barrier.wait()
            _mark_start(starts, r)
            stub.SubmitUpdate(pb.ClientUpdate(client_id=cid, round=r, num_examples=1,
                                              params=encode_named([("update", update)])), timeout=600)
            stub.GetModel(pb.ModelRequest(client_id=cid, round=r + 1), timeout=600)


def _secure_client(i, barrier, starts, meter, placement, port, certs, params, rounds, seed, spec_json):
    from securecollab.generated.v1 import secagg_pb2 as pb
    from securecollab.generated.v1 import secagg_pb2_grpc as pb_grpc
    from securecollab.updates import update_vector
    from services.secagg_client import upload

    spec = SecAggPlan.from_json(spec_json)
    cid, update = f"client-{i}", ready_update(i, params, seed)
    tls = TlsFiles.for_party(certs, cid)
    with make_channel(f"{placement.address('coordinator')}:{port}", tls=tls, meter=meter) as ch:
        wait_ready(ch)
        coord = pb_grpc.CoordinatorStub(ch)
        join = coord.Join(pb.SecAggJoinRequest(client_id=cid), timeout=60)
        parties = [pb_grpc.ComputePartyStub(make_channel(t, tls=tls, meter=meter, server_name=n))
                   for t, n in zip(join.party_targets, join.party_names)]
        # The delta from a zero model is the update itself, plus the count coordinate.
        vector = update_vector([("update", update)], [("update", np.zeros_like(update))])
        for r in range(rounds):
            coord.GetRound(pb.RoundRequest(client_id=cid, round=r), timeout=600)
            barrier.wait()
            _mark_start(starts, r)
            upload(cid, r, vector, parties, spec)
            coord.ReportUploaded(pb.UploadReport(client_id=cid, round=r), timeout=60)
        coord.GetRound(pb.RoundRequest(client_id=cid, round=rounds), timeout=600)


def _plain_round_walls(clients, params, rounds, seed, work: Path, certs: Path, layout: Layout):
    plan = FedAvgPlan(num_clients=clients, rounds=rounds, vector_length=params, record_transcripts=False)
    with ProcessGroup(work / "logs", layout.placement) as group:
        port = start_aggregator(group, plan, certs, work)
        starts, costs = _run_clients(clients, rounds, layout, _plain_client, port, certs, params, rounds, seed)
        group.wait("aggregator", timeout=120)
    done = json.loads((work / "rounds_aggregator.json").read_text())["aggregated_at"]
    return [d - s for s, d in zip(starts, done)], costs


def _secure_round_walls(clients, params, rounds, seed, work: Path, certs: Path, spec: SecAggPlan, layout: Layout):
    with ProcessGroup(work / "logs", layout.placement) as group:
        port = start_secagg_servers(group, spec, certs, work)
        starts, costs = _run_clients(clients, rounds, layout, _secure_client, port, certs, params, rounds, seed,
                                     spec.to_json())
        group.wait("coordinator", timeout=300)
    records = load_transcript(work / "transcripts" / "coordinator.jsonl").of_kind(Kind.AGGREGATE)
    # A round ends when the aggregate is revealed at the coordinator.
    walls = [rec.meta["phases"]["revealed"] - s for s, rec in zip(starts, records)]
    phases = [{k: v - s for k, v in rec.meta["phases"].items()} for s, rec in zip(starts, records)]
    return walls, costs, [rec.tensors["aggregate"] for rec in records], phases


MPC_METHODS = ("/securecollab.v1.MpcPeer/Deliver", "/securecollab.v1.MpcPeer/Hello",
               "/securecollab.v1.Dealer/Seed", "/securecollab.v1.Dealer/Correlated")


def _mpc_traffic(work: Path, parties: int, measured: int) -> dict:
    """Per compute party and measured round: CrypTen's count of what it sent in the MPC (payload; both
    transports), over grpc the gRPC bytes its MPC endpoint and channels sent and received, and its peak RSS."""
    out = {}
    for i in range(parties):
        name = f"party-{i}"
        stats = json.loads((work / f"mpc_stats_{name}.json").read_text())
        costs = _role_costs(work, name)
        out[name] = {"payload_bytes_per_round": stats.get("bytes", 0) / measured,
                     "messages_per_round": stats.get("rounds", 0) / measured,
                     "grpc_bytes_per_round": method_bytes(costs, *MPC_METHODS) / measured,
                     "peak_rss_mb": costs["peak_rss_mb"]}
    return out


def _secure_side(clients, params, rounds, warmup, seed, work: Path, certs: Path, spec: SecAggPlan, layout: Layout):
    walls, costs, revealed, phases = _secure_round_walls(clients, params, rounds, seed, work, certs, spec, layout)
    mpc = [p["shares_received"] - p["aggregate_requested"] for p in phases]
    return {"round_wall_s": statistics.median(walls[warmup:]), "round_wall_s_all": walls,
            "mpc_phase_s": statistics.median(mpc[warmup:]), "mpc_phase_s_all": mpc,
            "mpc_traffic": _mpc_traffic(work, spec.n_parties, rounds),
            "costs": costs, "revealed": revealed, "phases_s": phases}


def bench_secagg(clients: int, params: int, *, rounds: int = 5, warmup: int = 2, parties: int = 3,
                 seed_compression: bool = True, norm_bound: float = 0.0, norm_mode: str = "reject", robust: str = "",
                 narrow_ring: bool = True,
                 work_dir: Path, seed: int = 0, network: str = "loopback", client_processes: int = 0,
                 transports=("grpc", "gloo"), log=print) -> dict:
    """Aggregation rounds only: K clients with ready D-float updates, plain aggregator vs secure aggregation
    over each MPC transport (the first is reported as ``secure``, every one under ``by_transport``).

    All run `warmup + rounds` rounds; the first `warmup` (allocator growth, lazy
    initialisation in every process) are kept in `round_wall_s_all` but left
    out of the median. The MPC phase runs from the coordinator asking the parties to aggregate to their
    result shares being back. Under a `network` profile other than loopback every client and server is its
    own host on a shaped link (securecollab.net.testbed), plain and secure alike, and MPC runs over grpc only.
    With `client_processes` the clients are threads spread over that many processes (scale runs, loopback)."""
    if client_processes and network != "loopback":
        raise ValueError("clients sharing processes cannot each be a host of a network profile: use loopback")
    if network != "loopback" and "gloo" in transports:
        transports = tuple(t for t in transports if t != "gloo") or ("grpc",)
        log(f"{network}: gloo left out (its world binds loopback only); MPC over grpc")
    measured, rounds = rounds, warmup + rounds
    spec = SecAggPlan(training=FedAvgPlan(num_clients=clients, rounds=rounds, vector_length=params + 1,
                                          record_transcripts=False),
                      n_parties=parties, seed_compression=seed_compression, min_clients=clients,
                      norm_bound=norm_bound, norm_mode=norm_mode, robust=robust, narrow_ring=narrow_ring)
    ids = [f"client-{i}" for i in range(clients)]
    servers = ["aggregator", "coordinator", *[f"party-{i}" for i in range(parties)]]
    # The dealer's certificate is issued where it starts (runs.training); here only its host, when it has one.
    with testbed_or_loopback(network, ids, [*servers, *(["dealer"] if spec.needs_dealer else [])]) as placement:
        if placement.addresses:
            log(f"network profile {network}: {PROFILES[network].summary}, {len(placement.addresses)} hosts")
        certs = ensure_certs(work_dir / "certs", [*servers, *ids], placement)
        layout = Layout(placement, client_processes)
        shared = f" (threads of {client_processes} processes)" if client_processes else ""
        log(f"plain: aggregator + {clients} clients{shared}, D={params:,}, {rounds} rounds ...")
        plain_walls, plain_costs = _plain_round_walls(clients, params, rounds, seed, work_dir / "plain", certs, layout)
        by_transport = {transport: _transport_side(clients, params, rounds, warmup, seed, work_dir, certs,
                                                   dataclasses.replace(spec, mpc_transport=transport), layout, log)
                        for transport in transports}
    # The oracle: the same rule in the clear over the same ready-made updates (FLTrust's root update: index K).
    vectors = [np.append(ready_update(i, params, seed).astype(np.float64), 1.0) for i in range(clients)]
    rule = secure_rule(norm_bound=norm_bound or None, norm_mode=norm_mode, robust=robust or None,
                       reference=ready_update(clients, params, seed) if robust else None)
    expected = rule.clear(vectors, np.ones(clients))
    plain = {"round_wall_s": statistics.median(plain_walls[warmup:]), "round_wall_s_all": plain_walls,
             "upload_bytes_per_client": _upload_per_client(plain_costs, "/SubmitUpdate", rounds),
             "peak_rss_mb": {"aggregator": _role_costs(work_dir / "plain", "aggregator")["peak_rss_mb"],
                             "clients_process": max(c["peak_rss_mb"] for c in plain_costs)}}
    for side in by_transport.values():
        side["ratio_round_wall"] = side["round_wall_s"] / plain["round_wall_s"]
        side["max_abs_error"] = max(float(np.abs(a - expected).max()) for a in side.pop("revealed"))
    secure = by_transport[transports[0]]
    # Critical path of a round in sequential round trips (a delay the testbed does not emulate): plain, the
    # upload; secure, the upload, the report, the coordinator's call to the parties, their MPC rounds, the reveal.
    mpc_rounds = statistics.mean(t["messages_per_round"] for t in secure["mpc_traffic"].values())
    lm = {"plain": latency_model(1, PROFILES[network]), "secure": latency_model(4 + mpc_rounds, PROFILES[network])}
    return {
        "benchmark": "secagg", "clients": clients, "params": params, "rounds": measured, "warmup_rounds": warmup,
        "client_processes": client_processes or clients, "share_bits": spec.share_bits,
        "tls": "mutual", "network": network_description(PROFILES[network]),
        "plain": plain, "secure": secure, "by_transport": by_transport,
        "ratio": {"round_wall": secure["round_wall_s"] / plain["round_wall_s"],
                  "upload_bytes": secure["upload_bytes_per_client"] / plain["upload_bytes_per_client"],
                  "round_wall_with_rtt": (secure["round_wall_s"] + lm["secure"]["added_s_per_step"])
                  / (plain["round_wall_s"] + lm["plain"]["added_s_per_step"])},
        "latency_model": lm,
        "max_abs_error": secure["max_abs_error"],
    }


def _upload_per_client(costs, method, rounds):
    return statistics.mean(method_bytes(c, method, directions=("sent",)) for c in costs) / rounds


def _role_costs(work: Path, party: str) -> dict:
    """The cost file a server process wrote as it stopped (bytes by method, peak RSS)."""
    return json.loads((work / f"costs_{party}.json").read_text())


def _transport_side(clients, params, rounds, warmup, seed, work_dir, certs, run: SecAggPlan, layout: Layout,
                    log) -> dict:
    transport = run.mpc_transport
    log(f"secure over {transport}{' (INSECURE, for comparison)' if transport == 'gloo' else ''}: coordinator + "
        f"{run.n_parties} compute parties{' + dealer' if run.needs_dealer else ''} + {clients} clients ...")
    work = work_dir / f"secure_{transport}"
    side = _secure_side(clients, params, rounds, warmup, seed, work, certs, run, layout)
    costs = side.pop("costs")
    rss = {"coordinator": _role_costs(work, "coordinator")["peak_rss_mb"],
           **{name: t["peak_rss_mb"] for name, t in side["mpc_traffic"].items()},
           "clients_process": max(c["peak_rss_mb"] for c in costs)}
    return {**side, "upload_bytes_per_client": _upload_per_client(costs, "/SubmitShare", rounds), "peak_rss_mb": rss,
            "compute_parties": run.n_parties, "seed_compression": run.seed_compression, "norm_bound": run.norm_bound,
            "norm_mode": run.norm_mode if run.norm_bound else None, "robust": run.robust or None,
            "mpc_transport": transport}
