"""Load: many concurrent clients against the secure-aggregation coordinator and its compute parties,
and many concurrent encrypted-inference clients against one HE server.

The clients run as threads of this process, each with its own certificate and
mutual-TLS channels, doing exactly what `securecollab client secagg` (or
`securecollab infer`) does; the servers are separate processes as always.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def bench_secagg_load(clients: int = 100, rounds: int = 3, out: Path = Path("results/bench_load.json"),
                      log=print) -> dict:
    import torch

    from securecollab.launch import ProcessGroup, ensure_certs
    from securecollab.net.certs import TlsFiles
    from securecollab.net.costs import peak_rss_mb
    from securecollab.plans import FedAvgPlan, SecAggPlan
    from securecollab.runs.training import start_secagg_servers
    from services.secagg_client import run_client

    torch.set_num_threads(1)  # many client threads share two cores
    work = out.parent / "bench_load"
    plan = FedAvgPlan(num_clients=clients, rounds=rounds, local_epochs=1)
    spec = SecAggPlan(training=plan, min_clients=max(2, clients // 2), upload_deadline_s=300)
    ids = plan.client_ids()
    certs = ensure_certs(work / "certs", ["coordinator", "party-0", "party-1", "party-2", *ids])
    errors: list[str] = []

    def client(i: int, cid: str):
        try:
            return run_client(f"localhost:{port}", cid, i, tls=TlsFiles.for_party(certs, cid))
        except Exception as e:  # counted, not raised: the benchmark reports every failure
            errors.append(f"{cid}: {e!r}")

    log(f"secure aggregation under load: {clients} concurrent clients, {rounds} rounds, 3 compute parties")
    start = time.time()
    with ProcessGroup(work / "logs") as group:
        port = start_secagg_servers(group, spec, certs, work)
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda a: client(*a), enumerate(ids)))
        group.wait("coordinator", timeout=900)
    state = json.loads((work / "rounds_coordinator.json").read_text())
    ends = [start, *state["aggregated_at"]]
    round_s = [b - a for a, b in zip(ends, ends[1:])]
    rss = {p: json.loads((work / f"costs_{p}.json").read_text()).get("peak_rss_mb")
           for p in ["coordinator", "party-0", "party-1", "party-2"]}
    rss["clients (this process)"] = peak_rss_mb()
    included = [len(h.get("included", [])) for h in state["history"]]
    updates = sum(included)
    result = {
        "clients": clients, "rounds": rounds, "errors": errors,
        "clients_finished": sum(r is not None for r in results),
        "included_per_round": included,
        "round_wall_s": round_s, "median_round_wall_s": statistics.median(round_s),
        # steady state: the first round also waits for every client to start
        "updates_aggregated_per_s": sum(included[1:]) / sum(round_s[1:]) if rounds > 1 else updates / round_s[0],
        "peak_rss_mb": rss,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log(f"rounds took {', '.join(f'{s:.1f}' for s in round_s)} s (first includes start-up); "
        f"{result['updates_aggregated_per_s']:.1f} client updates aggregated per second after the first; "
        f"errors {len(errors)}; peak RSS MB {rss}")
    return result


HE_LOGIT_TOL = 0.05  # as in tests/test_he_service.py: max |decrypted - plaintext| logit accepted


def _proc_status_mb(pid: int | str, field: str) -> float | None:
    """A memory figure (VmRSS, VmHWM) of a live process, from /proc, in MB (None once it has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kb = [int(line.split()[1]) for line in status.splitlines() if line.startswith(field + ":")]
    return kb[0] / 1024 if kb else None


def _proc_cpu_s(pid: int | str) -> float:
    """User + system CPU seconds of a live process so far, from /proc."""
    import os
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _p50_p95(xs: list[float]) -> dict:
    import numpy as np
    if not xs:
        return {"p50": None, "p95": None, "max": None}
    p50, p95 = np.percentile(xs, [50, 95])
    return {"p50": float(p50), "p95": float(p95), "max": float(max(xs))}


def _fmt(p: dict) -> str:
    return "/".join("-" if p[k] is None else f"{p[k]:.2f}" for k in ("p50", "p95"))


def bench_he_load(queries_concurrent: int = 50, queries_per_client: int = 4,
                  out: Path = Path("results/bench_load_he.json"), log=print, plan=None) -> dict:
    """Many concurrent encrypted-inference clients against one HE server process, over mutual TLS.

    One `serve he` process (the x^2 convnet, weights trained here so the
    plaintext logits are the oracle; ``--max-sessions`` = the client count, so
    no session is evicted) and ``queries_concurrent`` clients, each a *thread
    of this process* with its own certificate, channel, CKKS keys and session
    (single queries only, as `securecollab infer` makes them). Two phases:

    * set-up: every client makes its keys and uploads its public context at
      once (keygen + upload per client is reported, p50/p95);
    * concurrent: when all sessions are open, every client sends
      ``queries_per_client`` encrypted single-image queries back to back, all
      clients at the same time; each decrypted answer is checked against the
      plaintext model (same argmax and max |logit error| <= 0.05), a mismatch
      is an error. Throughput is answered queries / the phase's wall time.

    Threads, not processes: TenSEAL holds the GIL, so keygen in client threads
    is serialized (measured: 2 keygens in 2 threads take 2x one, 0.75 s each),
    but per query a client needs ~0.01 s (encrypt + decrypt) against the
    server's ~0.14 s, which the server's own GIL serializes too: in the
    concurrent phase the server uses about one core and this process under 0.1
    (both reported in ``cpu_cores_used_concurrent``), so client processes
    would not raise throughput, while each would carry ~250 MB of imports
    (torch, TenSEAL, gRPC). The set-up phase is slower for it: the keygens of
    all clients share one core, so session set-up times here are far above a
    lone client's.
    """
    import numpy as np
    import torch

    from securecollab.launch import ProcessGroup, ensure_certs
    from securecollab.net.certs import TlsFiles
    from securecollab.net.costs import method_bytes, peak_rss_mb
    from securecollab.plans import HEModelPlan
    from securecollab.runs.inference import prepare, start_server
    from securecollab.training import predict_logits
    from services.he_client import HEClient

    torch.set_num_threads(1)  # the clients share two cores with the server
    n, q = queries_concurrent, queries_per_client
    plan = plan or HEModelPlan()
    work = out.parent / "bench_load_he"
    ids = [f"client-{i}" for i in range(n)]
    log(f"HE inference under load: training the served {plan.model} ({plan.activation}) on {plan.dataset} ...")
    model, ds, weights, _ = prepare(plan, work)
    certs = ensure_certs(work / "certs", ["he", *ids])
    reference = predict_logits(model, ds.x_test).astype(np.float64)
    errors: list[str] = []
    lock = threading.Lock()
    progress = {"opened": 0, "answered": 0}
    phase: dict = {}

    def tick(what: str, total: int, label: str) -> None:
        with lock:
            progress[what] += 1
            done = progress[what]
        if done == total or done % max(1, total // 5) == 0:
            log(f"  {label}: {done}/{total}")

    barrier = threading.Barrier(n, action=lambda: phase.update(
        start=time.perf_counter(), server_cpu0=_proc_cpu_s(server_pid), client_cpu0=time.process_time()))

    def client(i: int) -> dict | None:
        cid, passed, mine = ids[i], False, {"answers": []}
        try:
            with HEClient(target, tls=TlsFiles.for_party(certs, cid), party_id=cid) as c:
                mine["session"] = c.open_session()  # single queries only, as `securecollab infer` without --batch
                tick("opened", n, "sessions open")
                barrier.wait(timeout=1800)
                passed = True
                for j in range(q):
                    k = (i * q + j) % len(ds.x_test)
                    logits = c.infer(ds.x_test[k])
                    err = float(np.abs(logits - reference[k]).max())
                    ok = int(logits.argmax()) == int(reference[k].argmax()) and err <= HE_LOGIT_TOL
                    mine["answers"].append(ok)
                    if not ok:
                        errors.append(f"{cid} query {j} (test image {k}): decrypted argmax {int(logits.argmax())}, "
                                      f"plaintext {int(reference[k].argmax())}, max |logit error| {err:.3g}")
                    tick("answered", n * q, "encrypted queries answered")
                mine["done"] = time.perf_counter()
                mine["single"], mine["meter"] = c.single, c.meter.snapshot()
            return mine
        except Exception as e:  # counted, not raised: the benchmark reports every failure
            errors.append(f"{cid}: {e!r}")
            return mine if mine["answers"] else None
        finally:
            if not passed:  # the others must not wait for a client that failed to open its session
                try:
                    barrier.wait(timeout=1800)
                except threading.BrokenBarrierError:
                    pass

    log(f"HE inference under load: {n} concurrent clients (threads, each its own keys and session), "
        f"{q} encrypted single queries each")
    with ProcessGroup(work / "logs") as group:
        # max_batch 0: single queries only; a session slot for every client, so none is evicted
        port = start_server(group, plan, weights, certs, None, 0, max_sessions=n)
        target, server_pid = f"localhost:{port}", group.procs["he-server"].pid
        server_rss_idle = _proc_status_mb(server_pid, "VmRSS")
        client_rss_before = _proc_status_mb("self", "VmRSS")
        setup_start = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(client, range(n)))
        # every client has closed its session by now
        server_alive = group.procs["he-server"].poll() is None
        server_peak = _proc_status_mb(server_pid, "VmHWM")
        server_rss_closed = _proc_status_mb(server_pid, "VmRSS")
        server_cpu1 = _proc_cpu_s(server_pid) if server_alive else float("nan")
    client_cpu1 = time.process_time()
    if not server_alive:
        errors.append(f"the HE server exited during the benchmark:\n{group.tail('he-server')}")

    done = [r for r in results if r and "done" in r]
    sessions = [r["session"] for r in results if r and "session" in r]
    answers = [a for r in results if r for a in r["answers"]]
    latencies = [x for r in done for x in r["single"].latencies]
    answered = sum(r["single"].queries for r in done)
    wall = max(r["done"] for r in done) - phase["start"] if done and "start" in phase else float("nan")
    server_s = sum(r["single"].server_s for r in done)
    result = {
        "benchmark": "he_load", "model": plan.model, "dataset": plan.dataset, "tls": "mutual",
        "clients": n, "clients_as": "threads of one process", "queries_per_client": q,
        "queries": n * q, "queries_answered": len(answers), "answers_correct": sum(answers),
        "errors": errors, "clients_finished": len(done),
        "setup_wall_s": phase.get("start", float("nan")) - setup_start,
        "session_setup_s": {
            "keygen_plus_upload": _p50_p95([s["keygen_s"] + s["open_s"] for s in sessions]),
            "keygen": _p50_p95([s["keygen_s"] for s in sessions]),
            "upload_and_server_setup": _p50_p95([s["open_s"] for s in sessions]),
            "server_setup": _p50_p95([s["server_setup_s"] for s in sessions]),
        },
        "concurrent_wall_s": wall,
        "queries_per_s": answered / wall if answered else 0.0,
        "latency_s": _p50_p95(latencies),
        # time in the server's evaluation as it reports it: with its threads sharing one GIL this includes
        # waiting for the other evaluations (one alone is ~0.14 s); the rest of the latency is gRPC queueing
        "server_eval_s_mean": server_s / answered if answered else None,
        "cpu_cores_used_concurrent": {
            "server": (server_cpu1 - phase["server_cpu0"]) / wall if done and "start" in phase else None,
            "clients": (client_cpu1 - phase["client_cpu0"]) / wall if done and "start" in phase else None,
        },
        "bytes_per_query": sum(method_bytes(r["meter"], "/Infer") for r in done) / answered if answered else None,
        "session_key_bytes": statistics.mean(s["context_bytes"] for s in sessions) if sessions else None,
        "peak_rss_mb": {"server": server_peak, "clients (this process)": peak_rss_mb()},
        "rss_mb": {"server_idle": server_rss_idle, "server_after_sessions_closed": server_rss_closed,
                   "clients_before_start": client_rss_before},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    lat, setup = result["latency_s"], result["session_setup_s"]["keygen_plus_upload"]
    log(f"{result['answers_correct']}/{n * q} answers correct; {result['queries_per_s']:.2f} queries/s over "
        f"{wall:.1f} s; latency p50/p95 {_fmt(lat)} s; session set-up (keygen + upload) p50/p95 {_fmt(setup)} s; "
        f"errors {len(errors)}; peak RSS MB server {server_peak or float('nan'):.0f}, clients {peak_rss_mb():.0f}")
    return result
