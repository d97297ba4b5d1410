"""`securecollab bench mpc-inference`: model-private inference (CrypTen MPC: 3 parties and a dealer, each a process,
mutual TLS, on loopback or each on its host of a network profile) against plain inference, and beside `bench he`
run in the same command on the same test set, machine and profile."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from securecollab.net.costs import method_bytes
from securecollab.net.testbed import LOOPBACK, PROFILES, latency_model, network_description, testbed_or_loopback
from securecollab.plans import MpcInferencePlan
from securecollab.runs.mpc_inference import (CLIENT, client, deployment, infer_all, parties_round_trips,
                                             parties_sent, prepare)
from securecollab.training import predict_logits


def _per_input(before: dict, after: dict, inputs: int) -> dict:
    return {name: (after[name] - before[name]) / inputs for name in after}


def bench_output(plan: MpcInferencePlan, model, *, queries: int, batch_size: int, work_dir: Path, log=print,
                 placement=LOOPBACK) -> dict:
    """One deployment serving ``model`` with ``plan.output``: single-image latency, batched throughput, bytes,
    agreement, and the round trips of a single query among the servers (what a network's round-trip time
    multiplies)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    model, ds, certs = prepare(plan, work_dir, model, placement)
    reference = predict_logits(model, ds.x_test).astype(np.float64)
    t0 = time.perf_counter()
    with deployment(plan, work_dir, model, certs, placement=placement) as targets:
        setup_s = time.perf_counter() - t0
        with client(targets, certs, work_dir) as c:
            c.infer(ds.x_test[:1])  # connections and the parties' first-query set-up out of the timing
            start, snap0 = parties_sent(work_dir, plan.n_parties), c.meter.snapshot()
            trips0 = parties_round_trips(work_dir, plan.n_parties)
            log(f"  {queries} single-image queries ...")
            for i in range(queries):
                c.infer(ds.x_test[i:i + 1])
            single_lat = c.timings.latencies[-queries:]
            mid, snap1 = parties_sent(work_dir, plan.n_parties), c.meter.snapshot()
            trips = (parties_round_trips(work_dir, plan.n_parties) - trips0) / max(queries, 1)
            log(f"  the whole test set ({len(ds.x_test)} images) in batches of {batch_size} ...")
            t1 = time.perf_counter()
            answers = infer_all(c, ds.x_test, batch_size)
            batch_wall = time.perf_counter() - t1
            end = parties_sent(work_dir, plan.n_parties)
    predicted = answers if plan.output == "label" else answers.argmax(1)
    single_query_bytes = (method_bytes(snap1, "/Infer") - method_bytes(snap0, "/Infer")) / max(queries, 1)
    result = {
        "output": plan.output, "n_parties": plan.n_parties, "model": plan.model, "setup_s": setup_s,
        "party_targets": targets,
        "latency_s": statistics.median(single_lat) if single_lat else float("nan"),
        "throughput_per_s": len(ds.x_test) / batch_wall, "batch_size": batch_size,
        "query_bytes": single_query_bytes,
        # the parties' MPC rounds (each message waits for its answer), party 0's offers and its requests to the
        # dealer: the sequential round trips among the servers
        "mpc_round_trips_per_single_query": trips,
        "party_bytes_sent_per_single_query": _per_input(start, mid, max(queries, 1)),
        "party_bytes_sent_per_image_batched": _per_input(mid, end, len(ds.x_test)),
        "argmax_agreement": float((predicted == reference.argmax(1)).mean()),
        "accuracy": float((predicted == ds.y_test).mean()),
    }
    if plan.output == "logits":
        result["max_abs_logit_error"] = float(np.abs(answers - reference).max())
    return result


def bench_mpc_inference(plan: MpcInferencePlan, *, outputs=("logits", "label"), queries: int = 20,
                        batch_size: int = 150, he: bool = True, work_dir: Path, network: str = "loopback",
                        log=print) -> dict:
    """MPC inference in each output mode, plain inference of the same weights, and (``he``) `bench he` with the
    same number of single queries on the same test set, so that the figures share a machine and a moment.

    Under a ``network`` profile other than loopback every compute party and the dealer is a host of its own and
    the client (this process, which also uploads the owner's model) one more, each behind its shaped link; no
    delay is emulated, and ``latency_model`` adds the stated round-trip time for each sequential round trip of
    a single query (the client's call, the parties' MPC rounds, party 0's requests to the dealer)."""
    import secrets
    from dataclasses import replace
    model, ds = plan.train(seed=secrets.randbits(31))  # the owner's secret seed
    x = ds.x_test[:max(queries, 1)]
    predict_logits(model, x[:1])
    t0 = time.perf_counter()
    for i in range(len(x)):
        predict_logits(model, x[i:i + 1])
    plain = {"latency_s": (time.perf_counter() - t0) / len(x), "query_bytes": 4 * (x[0].size + ds.num_classes),
             "accuracy": float((predict_logits(model, ds.x_test).argmax(1) == ds.y_test).mean()),
             "notes": "the same weights in this process (float32 input and logits as the bytes)"}
    mpc = {}
    profile = PROFILES[network]
    servers = [*(f"party-{i}" for i in range(plan.n_parties)), "dealer"]
    with testbed_or_loopback(network, [CLIENT], servers, here=CLIENT) as placement:
        if network != "loopback":
            log(f"network profile {network}: {profile.summary}")
        for output in outputs:
            log(f"MPC inference, output {output}: {plan.n_parties} parties + dealer, network {network} ...")
            m = bench_output(replace(plan, output=output), model, queries=queries, batch_size=batch_size,
                             work_dir=work_dir / output, log=log, placement=placement)
            m["latency_model"] = latency_model(1 + m["mpc_round_trips_per_single_query"], profile)
            m["latency_with_rtt_s"] = m["latency_s"] + m["latency_model"]["added_s_per_step"]
            mpc[output] = m
    # The ratios of one output (label, the deployments' default, when measured). Plain inference ran in this
    # process: with a stated RTT it is a plaintext API one round trip away.
    main = mpc["label" if "label" in mpc else outputs[0]]
    plain["latency_model"] = latency_model(1, profile)
    ratio = {"output": main["output"], "latency": main["latency_s"] / plain["latency_s"],
             "latency_with_rtt": main["latency_with_rtt_s"]
             / (plain["latency_s"] + plain["latency_model"]["added_s_per_step"]),
             "query_bytes": main["query_bytes"] / plain["query_bytes"]}
    result = {"benchmark": "mpc-inference", "model": plan.model, "activation": plan.activation,
              "dataset": plan.dataset, "test_images": len(ds.x_test), "single_queries": queries, "tls": "mutual",
              "network": network_description(profile), "plain": plain, "mpc": mpc, "ratio": ratio}
    if he:
        from securecollab.bench.he import bench_he
        from securecollab.plans import HEModelPlan
        log("HE inference (CKKS, square activations) on the same test set ...")
        r = bench_he(HEModelPlan(model=plan.model, dataset=plan.dataset, dataset_path=plan.dataset_path,
                                 seed=plan.seed), queries=queries, batch_size=len(ds.x_test), batch_rounds=1,
                     work_dir=work_dir / "he", network=network, log=log)
        result["he"] = {"model": r["model"], "activation": r["activation"], "accuracy": r["he_accuracy"],
                        "plaintext_accuracy": r["plaintext_accuracy"], **{k: r["he"][k] for k in (
                            "latency_s", "throughput_per_s", "query_bytes", "session_key_bytes",
                            "argmax_agreement", "max_abs_logit_error")},
                        "latency_model": r["latency_model"],
                        "latency_with_rtt_s": r["he"]["latency_s"] + r["latency_model"]["added_s_per_step"]}
    return result
