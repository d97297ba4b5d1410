"""`securecollab bench he`: encrypted inference (CKKS) against plain inference, one server process on loopback."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from securecollab.launch import ProcessGroup
from securecollab.net.certs import TlsFiles
from securecollab.net.costs import method_bytes
from securecollab.net.testbed import PROFILES, latency_model, network_description, testbed_or_loopback
from securecollab.plans import HEModelPlan
from securecollab.runs.inference import CLIENT, PLAIN_CLIENT, agreement, prepare, server_peak_rss_mb, start_server
from securecollab.training import predict_logits


def friendly_vs_relu(plan: HEModelPlan, models=("convnet", "mlp")) -> dict:
    """Plaintext test accuracy of each HE-friendly (x^2) model beside the same network with ReLU,
    trained alike (the plan's epochs, lr and seed)."""
    from dataclasses import replace
    ds = plan.load_data()
    out = {}
    for model in models:
        out[model] = {}
        for act in ("square", "relu"):
            net, _ = replace(plan, model=model, activation=act).train(ds)
            out[model][act] = float((predict_logits(net, ds.x_test).argmax(1) == ds.y_test).mean())
    return out


def bench_he(plan: HEModelPlan, *, queries: int = 0, batch_size: int = 4096, batch_rounds: int = 2,
             work_dir: Path, network: str = "loopback", log=print) -> dict:
    """Single-query latency and batched throughput over mutual TLS on loopback, against plain inference.

    Single queries: the first ``queries`` test images (0: the whole test set), one
    at a time. Batched: full batches of ``batch_size`` images drawn cyclically
    from the test set, so every test image is covered when the batch is at
    least the test set's size; throughput is images per second end to end
    (encrypt, send, evaluate, return, decrypt), median over ``batch_rounds``. Under a `network` profile
    other than loopback the server is a host on a shaped link and this process (the clients) another.
    """
    log(f"training {plan.model} ({plan.activation}) on {plan.dataset} ...")
    with testbed_or_loopback(network, [CLIENT], ["he-server"], here=CLIENT) as placement:
        if placement.addresses:
            log(f"network profile {network}: {PROFILES[network].summary}")
        return _bench_he(plan, queries, batch_size, batch_rounds, work_dir, placement, network, log)


def _bench_he(plan, queries, batch_size, batch_rounds, work_dir, placement, network, log) -> dict:
    from services.he_client import HEClient, Timings

    model, ds, weights, certs = prepare(plan, work_dir, placement)
    x_test = ds.x_test if not queries else ds.x_test[:queries]
    reference = predict_logits(model, ds.x_test).astype(np.float64)
    with ProcessGroup(work_dir / "logs", placement) as group:
        port = start_server(group, plan, weights, certs, None, batch_size)
        target = f"{placement.address('he-server')}:{port}"
        with HEClient(target, tls=TlsFiles.for_party(certs, PLAIN_CLIENT), party_id=PLAIN_CLIENT) as plain:
            plain.predict_plain(ds.x_test[:1])  # connection and lazy initialisation out of the timing
            plain.plain = Timings()
            for xi in x_test[:min(len(x_test), 100)]:
                plain.predict_plain(xi[None])
            plain_bytes = method_bytes(plain.meter.snapshot(), "/PredictPlain") / (plain.plain.queries + 1)
        log(f"HE session (batch size {batch_size}): making keys ...")
        with HEClient(target, tls=TlsFiles.for_party(certs, CLIENT), party_id=CLIENT) as client:
            session = client.open_session(batch_size=batch_size)
            log(f"{len(x_test)} single encrypted queries ...")
            single = np.stack([client.infer(xi) for xi in x_test])
            query_bytes = method_bytes(client.meter.snapshot(), "/Infer") / client.single.queries
            log(f"{batch_rounds} full batches of {batch_size} ...")
            cyclic = np.resize(ds.x_test, (batch_size, *ds.x_test.shape[1:])).astype(np.float32)
            batch_walls, batched = [], None
            for _ in range(batch_rounds):
                t0 = time.perf_counter()
                batched = client.infer_batch(cyclic)
                batch_walls.append(time.perf_counter() - t0)
            batch_bytes = method_bytes(client.meter.snapshot(), "/InferBatch") / batch_rounds
            session_key_bytes = method_bytes(client.meter.snapshot(), "/OpenSession")
        peak_rss = server_peak_rss_mb(group)

    t, encoding = client.single, client.description.input_encoding
    single_check = agreement(single, reference[:len(x_test)])
    batch_check = agreement(batched, np.resize(reference, (batch_size, reference.shape[1])))
    n = t.queries
    he = {
        "latency_s": statistics.median(t.latencies),
        "latency_s_mean": statistics.mean(t.latencies),
        "throughput_per_s": batch_size / statistics.median(batch_walls),
        "query_bytes": query_bytes,
        "session_key_bytes": session_key_bytes,
        "argmax_agreement": min(single_check["argmax_agreement"], batch_check["argmax_agreement"]),
        "max_abs_logit_error": max(single_check["max_abs_logit_error"], batch_check["max_abs_logit_error"]),
        "single": {**single_check, "stages_s": {"keygen": session["keygen_s"], "encrypt": t.encrypt_s / n,
                                                "network_and_server": t.rpc_s / n, "server": t.server_s / n,
                                                "decrypt": t.decrypt_s / n}},
        "batched": {**batch_check, "batch_size": batch_size, "batch_wall_s": batch_walls,
                    "batch_bytes": batch_bytes,
                    "stages_s": {"encrypt": client.batched.encrypt_s / batch_rounds,
                                 "network_and_server": client.batched.rpc_s / batch_rounds,
                                 "server": client.batched.server_s / batch_rounds,
                                 "decrypt": client.batched.decrypt_s / batch_rounds}},
        "session": {k: session[k] for k in ("keygen_s", "open_s", "server_setup_s", "slot_count", "galois_steps")},
        "input_layout": {"im2col": encoding.im2col is not None, "ciphertexts": encoding.ciphertexts,
                         "period": encoding.period},
        "server_peak_rss_mb": peak_rss,
    }
    plain_stats = {"latency_s": statistics.median(plain.plain.latencies), "query_bytes": plain_bytes}
    return {
        "benchmark": "he", "model": plan.model, "activation": plan.activation, "dataset": plan.dataset,
        "test_images": len(ds.x_test), "single_queries": len(x_test), "tls": "mutual",
        "network": network_description(PROFILES[network]),
        "latency_model": latency_model(1, PROFILES[network]),  # one call per query (the session opened once)
        "plaintext_accuracy": float((reference.argmax(1) == ds.y_test).mean()),
        "he_accuracy": float((single.argmax(1) == ds.y_test[:len(x_test)]).mean()),
        "plaintext_accuracy_by_activation": friendly_vs_relu(plan),
        "plain": plain_stats, "he": he,
        "ratio": {"latency": he["latency_s"] / plain_stats["latency_s"],
                  "latency_with_rtt": (he["latency_s"] + PROFILES[network].rtt_ms / 1000)
                  / (plain_stats["latency_s"] + PROFILES[network].rtt_ms / 1000),
                  "query_bytes": he["query_bytes"] / plain_stats["query_bytes"]},
    }
