"""Load: many concurrent clients against the secure-aggregation coordinator and its compute parties.

The clients run as threads of this process, each with its own certificate and
mutual-TLS channels, doing exactly what `securecollab client secagg` does; the
coordinator and parties are separate processes as always.
"""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def bench_secagg_load(clients: int = 100, rounds: int = 3, out: Path = Path("results/bench_load.json"),
                      log=print) -> dict:
    import torch

    from securecollab.certs import TlsFiles
    from securecollab.costs import peak_rss_mb
    from securecollab.launch import ProcessGroup
    from securecollab.protocols.fedavg import FedAvgPlan
    from securecollab.protocols.secagg import SecAggPlan
    from securecollab.runs import ensure_certs, start_secagg_servers
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
