"""Overhead benchmarks: a secure protocol against its plain counterpart on the same loopback setup."""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from securecollab.certs import TlsFiles
from securecollab.costs import CostMeter
from securecollab.launch import ProcessGroup
from securecollab.protocols.fedavg import FedAvgPlan
from securecollab.protocols.secagg import SecAggPlan
from securecollab.runs import ensure_certs, start_aggregator, start_secagg_servers
from securecollab.transcript import load_transcript
from securecollab.transport import make_channel, wait_ready


def _ready_updates(clients: int, params: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.05, params).astype(np.float32) for _ in range(clients)]


def _run_clients(n: int, body) -> list[dict]:
    """Run `body(i, barrier, meter)` for n clients in threads; returns each client's cost snapshot."""
    barrier = threading.Barrier(n)
    meters = [CostMeter(f"client-{i}") for i in range(n)]
    errors: list[BaseException] = []

    def run(i):
        try:
            body(i, barrier, meters[i])
        except BaseException as e:  # surfaced below, after every thread ends
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [m.snapshot() for m in meters]


def _plain_round_walls(updates, rounds: int, work: Path, certs: Path) -> tuple[list[float], list[dict]]:
    from securecollab.v1 import fedavg_pb2 as pb
    from securecollab.v1 import fedavg_pb2_grpc as pb_grpc
    from securecollab.wire import encode_named

    plan = FedAvgPlan(num_clients=len(updates), rounds=rounds, vector_length=len(updates[0]),
                      record_transcripts=False)
    starts = [float("inf")] * rounds
    lock = threading.Lock()
    with ProcessGroup(work / "logs") as group:
        port = start_aggregator(group, plan, certs, work)

        def client(i, barrier, meter):
            cid = f"client-{i}"
            with make_channel(f"localhost:{port}", tls=TlsFiles.for_party(certs, cid), meter=meter) as ch:
                wait_ready(ch)
                stub = pb_grpc.FedAvgAggregatorStub(ch)
                stub.Join(pb.JoinRequest(client_id=cid), timeout=60)
                for r in range(rounds):
                    barrier.wait()
                    with lock:
                        starts[r] = min(starts[r], time.time())
                    stub.SubmitUpdate(pb.ClientUpdate(client_id=cid, round=r, num_examples=1,
                                                      params=encode_named([("update", updates[i])])), timeout=600)
                    stub.GetModel(pb.ModelRequest(client_id=cid, round=r + 1), timeout=600)

        costs = _run_clients(len(updates), client)
        group.wait("aggregator", timeout=120)
    done = json.loads((work / "rounds_aggregator.json").read_text())["aggregated_at"]
    return [d - s for s, d in zip(starts, done)], costs


def _secure_round_walls(updates, rounds: int, work: Path, certs: Path, spec: SecAggPlan):
    from securecollab.protocols.secagg import update_vector
    from securecollab.v1 import secagg_pb2 as pb
    from securecollab.v1 import secagg_pb2_grpc as pb_grpc
    from services.secagg_client import upload

    starts = [float("inf")] * rounds
    lock = threading.Lock()
    with ProcessGroup(work / "logs") as group:
        port = start_secagg_servers(group, spec, certs, work)

        def client(i, barrier, meter):
            cid = f"client-{i}"
            tls = TlsFiles.for_party(certs, cid)
            with make_channel(f"localhost:{port}", tls=tls, meter=meter) as ch:
                wait_ready(ch)
                coord = pb_grpc.CoordinatorStub(ch)
                join = coord.Join(pb.SecAggJoinRequest(client_id=cid), timeout=60)
                parties = [pb_grpc.ComputePartyStub(make_channel(t, tls=tls, meter=meter, server_name=n))
                           for t, n in zip(join.party_targets, join.party_names)]
                zero = [("update", np.zeros_like(updates[i]))]
                vector = update_vector([("update", updates[i])], zero)  # the delta from a zero model, plus the count
                for r in range(rounds):
                    coord.GetRound(pb.RoundRequest(client_id=cid, round=r), timeout=600)
                    barrier.wait()
                    with lock:
                        starts[r] = min(starts[r], time.time())
                    upload(cid, r, vector, parties, spec)
                    coord.ReportUploaded(pb.UploadReport(client_id=cid, round=r), timeout=60)
                coord.GetRound(pb.RoundRequest(client_id=cid, round=rounds), timeout=600)

        costs = _run_clients(len(updates), client)
        group.wait("coordinator", timeout=300)
    records = load_transcript(work / "transcripts" / "coordinator.jsonl").of_kind("aggregate")
    # A round ends when the aggregate is revealed at the coordinator.
    walls = [rec.meta["phases"]["revealed"] - s for s, rec in zip(starts, records)]
    phases = [{k: v - s for k, v in rec.meta["phases"].items()} for s, rec in zip(starts, records)]
    return walls, costs, [rec.tensors["aggregate"] for rec in records], phases


def bench_secagg(clients: int, params: int, *, rounds: int = 3, parties: int = 3, seed_compression: bool = True,
                 norm_bound: float = 0.0, work_dir: Path, seed: int = 0, log=print) -> dict:
    """Aggregation rounds only: K clients with ready D-float updates, plain aggregator vs secure aggregation."""
    updates = _ready_updates(clients, params, seed)
    ids = [f"client-{i}" for i in range(clients)]
    certs = ensure_certs(work_dir / "certs", ["aggregator", "coordinator",
                                              *[f"party-{i}" for i in range(parties)], *ids])
    log(f"plain: aggregator + {clients} clients, D={params:,}, {rounds} rounds ...")
    plain_walls, plain_costs = _plain_round_walls(updates, rounds, work_dir / "plain", certs)
    spec = SecAggPlan(training=FedAvgPlan(num_clients=clients, rounds=rounds, vector_length=params + 1,
                                          record_transcripts=False),
                      n_parties=parties, seed_compression=seed_compression, min_clients=clients,
                      norm_bound=norm_bound)
    log(f"secure: coordinator + {parties} compute parties{' + dealer' if spec.needs_dealer else ''} "
        f"+ {clients} clients ...")
    secure_walls, secure_costs, revealed, phases = _secure_round_walls(updates, rounds, work_dir / "secure", certs, spec)
    expected = np.sum(np.stack(updates).astype(np.float64), axis=0)
    max_err = max(float(np.abs(a[:-1] - expected).max()) for a in revealed)

    def upload_per_client(costs, method):
        return statistics.mean(sum(v for k, v in c["by_method"]["sent"].items() if k.endswith(method))
                               for c in costs) / rounds

    plain = {"round_wall_s": statistics.median(plain_walls), "round_wall_s_all": plain_walls,
             "upload_bytes_per_client": upload_per_client(plain_costs, "/SubmitUpdate")}
    secure = {"round_wall_s": statistics.median(secure_walls), "round_wall_s_all": secure_walls,
              "upload_bytes_per_client": upload_per_client(secure_costs, "/SubmitShare"),
              "compute_parties": parties, "seed_compression": seed_compression, "norm_bound": norm_bound,
              # seconds from the round's first upload: when uploads closed, MPC asked, shares back, revealed
              "phases_s": phases}
    return {
        "benchmark": "secagg", "clients": clients, "params": params, "rounds": rounds, "tls": "mutual",
        "plain": plain, "secure": secure,
        "ratio": {"round_wall": secure["round_wall_s"] / plain["round_wall_s"],
                  "upload_bytes": secure["upload_bytes_per_client"] / plain["upload_bytes_per_client"]},
        "max_abs_error": max_err,
    }
