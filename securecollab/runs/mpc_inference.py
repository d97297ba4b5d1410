"""Model-private inference end to end: a dealer and n compute parties as processes, the owner's upload, a
client's queries over the whole test set. The demo's run, `bench mpc-inference` and the tests start it here.

The owner trains the model here (deterministically from the plan's seed), so the plaintext logits computed
here are the oracle for what the client reconstructs; the parties only ever hold shares of the weights."""

from __future__ import annotations

import json
import secrets
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from securecollab.launch import ProcessGroup, ensure_certs, securecollab_cmd
from securecollab.net.certs import TlsFiles
from securecollab.net.costs import CostMeter
from securecollab.net.testbed import LOOPBACK, Placement
from securecollab.plans import MpcInferencePlan, save_weights
from securecollab.runs import register
from securecollab.runs.training import free_port
from securecollab.training import predict_logits
from securecollab.transcript import TranscriptRecorder

CLIENT = "client-0"
OWNER = "owner"


def prepare(plan: MpcInferencePlan, work: Path, model=None, placement: Placement = LOOPBACK):
    """(model, dataset, certs dir): the owner's model (trained here from a secret seed unless given), saved as
    ``mpc_model.npz`` (numpy, no pickle; for scoring the attacks: no party reads it); certificates valid for the
    hosts of ``placement``."""
    if model is None:
        model, ds = plan.train(seed=secrets.randbits(31))
    else:
        ds = plan.load_data()
    save_weights(model, work / "mpc_model.npz")
    parties = [f"party-{i}" for i in range(plan.n_parties)]
    certs = ensure_certs(work / "certs", [*parties, "dealer", OWNER, CLIENT], placement)
    return model, ds, certs


def start_parties(group: ProcessGroup, plan: MpcInferencePlan, certs: Path, out_dir: Path) -> list[str]:
    """A dealer of its own and the compute parties (each restarted when it asks to rejoin a new world), on
    loopback or each on its host of the group's placement; returns the parties' inference targets, in index
    order."""
    from services.mpc_party import EXIT_REJOIN
    where = group.placement
    parties = [f"party-{i}" for i in range(plan.n_parties)]
    endpoints = [f"{where.address(name)}:{free_port()}" for name in parties]
    dealer = f"{where.address('dealer')}:{free_port()}"
    common = ["--certs", str(certs), "--out", str(out_dir)]
    group.start("dealer", securecollab_cmd("serve", "dealer", "--compute-parties", str(plan.n_parties), *common,
                                           "--host", where.bind("dealer"), "--port", dealer.rsplit(":", 1)[1]),
                restart_on=(EXIT_REJOIN,))
    for i, name in enumerate(parties):
        port_file = group.log_dir / f"{name}.port"
        port_file.unlink(missing_ok=True)
        group.start(name, securecollab_cmd(
            "serve", "mpc", "--index", str(i), "--plan-json", plan.to_json(), *common, "--host", where.bind(name),
            *[a for e in endpoints for a in ("--mpc-peer", e)], "--dealer", dealer,
            "--state", str(out_dir / "state" / name),
            "--port", str(free_port()), "--port-file", str(port_file)), restart_on=(EXIT_REJOIN,))
    ports = group.wait_ports(parties, timeout=300, watch=("dealer",))
    return [f"{where.address(name)}:{p}" for name, p in zip(parties, ports)]


@contextmanager
def deployment(plan: MpcInferencePlan, out_dir: Path, model, certs: Path, owner_meter: CostMeter | None = None,
               placement: Placement = LOOPBACK):
    """A running deployment serving ``model`` (uploaded by its owner from this process): yields the parties'
    targets. Under a network profile's ``placement`` each party and the dealer is a host of its own."""
    from services.mpc_client import upload_model
    with ProcessGroup(out_dir / "logs", placement) as group:
        targets = start_parties(group, plan, certs, out_dir)
        upload_model(targets, tls=TlsFiles.for_party(certs, OWNER), model=model, meter=owner_meter)
        yield targets


def client(targets: list[str], certs: Path, out_dir: Path, party_id: str = CLIENT):
    from services.mpc_client import MpcInferenceClient
    return MpcInferenceClient(targets, tls=TlsFiles.for_party(certs, party_id), party_id=party_id,
                              transcript=TranscriptRecorder(out_dir / "transcripts" / f"{party_id}.jsonl",
                                                            party=party_id, role="client"))


def infer_all(c, x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([c.infer(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def party_costs(out_dir: Path, n_parties: int) -> dict:
    """Bytes and CPU of every compute party and the dealer (their own meters), summed; their largest peak RSS."""
    total = {"bytes_sent": 0, "bytes_received": 0, "cpu_s": 0.0, "peak_rss_mb": 0.0}
    for name in [*(f"party-{i}" for i in range(n_parties)), "dealer"]:
        path = out_dir / f"costs_{name}.json"
        if path.exists():
            costs = json.loads(path.read_text())
            for k in ("bytes_sent", "bytes_received", "cpu_s"):
                total[k] += costs.get(k, 0)
            total["peak_rss_mb"] = max(total["peak_rss_mb"], costs.get("peak_rss_mb", 0.0))
    return total


def parties_sent(out_dir: Path, n_parties: int, settle_s: float = 1.0) -> dict[str, int]:
    """Bytes each compute party has sent so far (its meter, written after every query: ``settle_s`` lets the last
    write land). The dealer's meter is written every 5 s only: its bytes are in its costs file."""
    time.sleep(settle_s)
    sent = {}
    for name in (f"party-{i}" for i in range(n_parties)):
        path = out_dir / f"costs_{name}.json"
        sent[name] = int(json.loads(path.read_text()).get("bytes_sent", 0)) if path.exists() else 0
    return sent


def parties_round_trips(out_dir: Path, n_parties: int) -> int:
    """The most sequential round trips any compute party has made so far: its MPC communication rounds
    (CrypTen's count: each message waits for its answer) and, party 0, its requests to the dealer. Written with
    its costs after every query; read after :func:`parties_sent`, which lets that write land."""
    trips = []
    for path in (out_dir / f"mpc_stats_party-{i}.json" for i in range(n_parties)):
        if path.exists():
            stats = json.loads(path.read_text())
            trips.append(stats.get("rounds", 0) + stats.get("dealer_requests", 0))
    return max(trips, default=0)


def run_mpc_inference(plan: MpcInferencePlan, out_dir: Path, *, batch_size: int = 150, single: int = 5) -> dict:
    """The demo's model-private inference: the whole test set in batches, ``single`` one-image queries; the same
    weights evaluated in the clear in this process are the baseline (no network: the parties never hold them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model, ds, certs = prepare(plan, out_dir)
    t0, c0 = time.perf_counter(), time.process_time()
    reference = predict_logits(model, ds.x_test).astype(np.float64)
    plain_costs = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "bytes_sent": 0,
                   "bytes_received": 0, "peak_rss_mb": CostMeter("plain").snapshot()["peak_rss_mb"]}
    t0 = time.perf_counter()
    with deployment(plan, out_dir, model, certs) as targets:
        with client(targets, certs, out_dir) as c:
            before = parties_sent(out_dir, plan.n_parties, settle_s=0)
            t1 = time.perf_counter()
            answers = infer_all(c, ds.x_test, batch_size)
            batch_wall = time.perf_counter() - t1
            after = parties_sent(out_dir, plan.n_parties)
            for i in range(single):
                c.infer(ds.x_test[i:i + 1])
            client_costs = c.meter.snapshot()
            latencies = c.timings.latencies[-single:] if single else [float("nan")]
    wall = time.perf_counter() - t0  # processes, world, upload, queries
    predicted = answers if plan.output == "label" else answers.argmax(1)
    parties = party_costs(out_dir, plan.n_parties)
    metrics = {"model": plan.model, "n_parties": plan.n_parties, "output": plan.output,
               "label_agreement": float((predicted == reference.argmax(1)).mean()),
               "single_latency_s": statistics.median(latencies), "batch_size": batch_size,
               "batched_test_set_wall_s": batch_wall,
               "party_bytes_sent_per_image": max(after[p] - before[p] for p in after) / len(ds.x_test)}
    if plan.output == "logits":
        metrics["max_abs_logit_error"] = float(np.abs(answers - reference).max())
    result = {
        "accuracy": float((predicted == ds.y_test).mean()),
        # the parties' traffic between them counts: it is most of the protocol's cost
        "costs": {"wall_s": wall, "cpu_s": client_costs["cpu_s"] + parties["cpu_s"],
                  "bytes_sent": client_costs["bytes_sent"] + parties["bytes_sent"],
                  "bytes_received": client_costs["bytes_received"] + parties["bytes_received"],
                  "peak_rss_mb": parties["peak_rss_mb"]},
        "baseline": {"protocol": "plain_inference", "accuracy": float((reference.argmax(1) == ds.y_test).mean()),
                     "costs": plain_costs, "notes": "the same weights evaluated in the clear in one process"},
        "metrics": metrics,
    }
    (out_dir / "result_mpc_inference.json").write_text(json.dumps(result, indent=2))
    return result


@register("mpc_inference")
def run_mpc(plan, out_dir: Path, **_) -> dict:
    """Model-private inference (CrypTen MPC, 3 parties, label only) of the test set, beside plaintext inference."""
    images = len(plan.load_data().input_shape) == 3
    return run_mpc_inference(MpcInferencePlan(model="convnet" if images else "mlp", dataset=plan.dataset,
                                              dataset_path=plan.dataset_path, seed=plan.seed), out_dir)
