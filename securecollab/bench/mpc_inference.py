"""`securecollab bench mpc-inference`: model-private inference (CrypTen MPC: 3 parties and a dealer, each a process,
mutual TLS on loopback) against plain inference, and beside `bench he` run in the same command on the same
test set and machine."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from securecollab.net.costs import method_bytes
from securecollab.plans import MpcInferencePlan
from securecollab.runs.mpc_inference import client, deployment, infer_all, parties_sent, prepare
from securecollab.training import predict_logits


def _per_input(before: dict, after: dict, inputs: int) -> dict:
    return {name: (after[name] - before[name]) / inputs for name in after}


def bench_output(plan: MpcInferencePlan, model, *, queries: int, batch_size: int, work_dir: Path, log=print) -> dict:
    """One deployment serving ``model`` with ``plan.output``: single-image latency, batched throughput, bytes,
    agreement."""
    work_dir.mkdir(parents=True, exist_ok=True)
    model, ds, certs = prepare(plan, work_dir, model)
    reference = predict_logits(model, ds.x_test).astype(np.float64)
    t0 = time.perf_counter()
    with deployment(plan, work_dir, model, certs) as targets:
        setup_s = time.perf_counter() - t0
        with client(targets, certs, work_dir) as c:
            c.infer(ds.x_test[:1])  # connections and the parties' first-query set-up out of the timing
            start, snap0 = parties_sent(work_dir, plan.n_parties), c.meter.snapshot()
            log(f"  {queries} single-image queries ...")
            for i in range(queries):
                c.infer(ds.x_test[i:i + 1])
            single_lat = c.timings.latencies[-queries:]
            mid, snap1 = parties_sent(work_dir, plan.n_parties), c.meter.snapshot()
            log(f"  the whole test set ({len(ds.x_test)} images) in batches of {batch_size} ...")
            t1 = time.perf_counter()
            answers = infer_all(c, ds.x_test, batch_size)
            batch_wall = time.perf_counter() - t1
            end = parties_sent(work_dir, plan.n_parties)
    predicted = answers if plan.output == "label" else answers.argmax(1)
    single_query_bytes = (method_bytes(snap1, "/Infer") - method_bytes(snap0, "/Infer")) / max(queries, 1)
    result = {
        "output": plan.output, "n_parties": plan.n_parties, "model": plan.model, "setup_s": setup_s,
        "latency_s": statistics.median(single_lat) if single_lat else float("nan"),
        "throughput_per_s": len(ds.x_test) / batch_wall, "batch_size": batch_size,
        "query_bytes": single_query_bytes,
        "party_bytes_sent_per_single_query": _per_input(start, mid, max(queries, 1)),
        "party_bytes_sent_per_image_batched": _per_input(mid, end, len(ds.x_test)),
        "argmax_agreement": float((predicted == reference.argmax(1)).mean()),
        "accuracy": float((predicted == ds.y_test).mean()),
    }
    if plan.output == "logits":
        result["max_abs_logit_error"] = float(np.abs(answers - reference).max())
    return result


def bench_mpc_inference(plan: MpcInferencePlan, *, outputs=("logits", "label"), queries: int = 20,
                        batch_size: int = 150, he: bool = True, work_dir: Path, log=print) -> dict:
    """MPC inference in each output mode, plain inference of the same weights, and (``he``) `bench he` with the
    same number of single queries on the same test set, so that the figures share a machine and a moment."""
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
    for output in outputs:
        log(f"MPC inference, output {output}: {plan.n_parties} parties + dealer on loopback ...")
        mpc[output] = bench_output(replace(plan, output=output), model, queries=queries, batch_size=batch_size,
                                   work_dir=work_dir / output, log=log)
    result = {"benchmark": "mpc-inference", "model": plan.model, "activation": plan.activation,
              "dataset": plan.dataset, "test_images": len(ds.x_test), "single_queries": queries, "tls": "mutual",
              "network": "loopback (every party a process on this machine)", "plain": plain, "mpc": mpc}
    if he:
        from securecollab.bench.he import bench_he
        from securecollab.plans import HEModelPlan
        log("HE inference (CKKS, square activations) on the same test set ...")
        r = bench_he(HEModelPlan(model=plan.model, dataset=plan.dataset, dataset_path=plan.dataset_path,
                                 seed=plan.seed), queries=queries, batch_size=len(ds.x_test), batch_rounds=1,
                     work_dir=work_dir / "he", log=log)
        result["he"] = {"model": r["model"], "activation": r["activation"], "accuracy": r["he_accuracy"],
                        "plaintext_accuracy": r["plaintext_accuracy"], **{k: r["he"][k] for k in (
                            "latency_s", "throughput_per_s", "query_bytes", "session_key_bytes",
                            "argmax_agreement", "max_abs_logit_error")}}
    return result
