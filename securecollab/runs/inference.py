"""Encrypted inference end to end against an HE server process: the demo's run and `bench he`.

The model is trained here (deterministically from the plan's seed) and the
server process loads the very same weights, so the plaintext logits computed
here are the oracle for the decrypted ones.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from securecollab.launch import ProcessGroup, securecollab_cmd
from securecollab.net.certs import TlsFiles
from securecollab.net.testbed import LOOPBACK, Placement
from securecollab.plans import HEModelPlan, save_weights
from securecollab.runs import register
from securecollab.training import predict_logits
from securecollab.transcript import TranscriptRecorder

CLIENT = "client-0"
PLAIN_CLIENT = "client-1"


def prepare(plan: HEModelPlan, work: Path, placement: Placement = LOOPBACK, *, seed: int | None = None):
    """(model, dataset, weights path, certs dir): the trained model (from the plan's seed, or ``seed``: a secret
    one where whoever holds the plan must not be able to train the very same model) and what the server needs."""
    from securecollab.launch import ensure_certs
    model, ds = plan.train(seed=seed)
    weights = work / "he_model.npz"
    save_weights(model, weights)
    certs = ensure_certs(work / "certs", ["he", CLIENT, PLAIN_CLIENT], placement)
    return model, ds, weights, certs


def start_server(group: ProcessGroup, plan: HEModelPlan, weights: Path, certs: Path,
                 out_dir: Path | None, max_batch: int, max_sessions: int = 2) -> int:
    extra = ["--out", str(out_dir)] if out_dir else []
    return group.start_service("he-server", securecollab_cmd(
        "serve", "he", "--plan-json", plan.to_json(), "--weights", str(weights), "--certs", str(certs),
        "--host", group.placement.bind("he-server"), "--max-batch", str(max_batch),
        "--max-sessions", str(max_sessions), *extra),
        timeout=300)


def server_peak_rss_mb(group: ProcessGroup) -> float:
    """The server's peak resident memory so far (VmHWM), read from /proc."""
    status = Path(f"/proc/{group.procs['he-server'].pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")) / 1024


def agreement(he_logits: np.ndarray, plain_logits: np.ndarray) -> dict:
    return {"n": len(he_logits),
            "argmax_agreement": float((he_logits.argmax(1) == plain_logits.argmax(1)).mean()),
            "max_abs_logit_error": float(np.abs(he_logits - plain_logits).max())}


def run_he_inference(plan: HEModelPlan, out_dir: Path, *, show: int = 8, batch_size: int | None = None) -> dict:
    """The demo's encrypted inference: the whole test set batched, ``show`` images one query each.

    Returns a scorecard entry with the plain inference API (same server, the
    server sees the images) as its baseline.
    """
    from services.he_client import HEClient

    out_dir.mkdir(parents=True, exist_ok=True)
    model, ds, weights, certs = prepare(plan, out_dir)
    reference = predict_logits(model, ds.x_test).astype(np.float64)
    batch_size = batch_size or min(len(ds.x_test), 4096)  # one batch fills at most the slots of N=8192
    with ProcessGroup(out_dir / "logs") as group:
        port = start_server(group, plan, weights, certs, out_dir, batch_size)
        target = f"localhost:{port}"
        t0, c0 = time.perf_counter(), time.process_time()
        with HEClient(target, tls=TlsFiles.for_party(certs, PLAIN_CLIENT), party_id=PLAIN_CLIENT,
                      transcript=TranscriptRecorder(out_dir / "transcripts" / f"{PLAIN_CLIENT}.jsonl",
                                                    party=PLAIN_CLIENT, role="client")) as plain:
            plain_logits = np.concatenate([plain.predict_plain(ds.x_test[i:i + 1024])
                                           for i in range(0, len(ds.x_test), 1024)])
        plain_costs = _run_costs(plain, t0, c0, server_peak_rss_mb(group))
        t0, c0 = time.perf_counter(), time.process_time()
        with HEClient(target, tls=TlsFiles.for_party(certs, CLIENT), party_id=CLIENT,
                      transcript=TranscriptRecorder(out_dir / "transcripts" / f"{CLIENT}.jsonl",
                                                    party=CLIENT, role="client")) as client:
            session = client.open_session(batch_size=batch_size)
            batched = client.infer_batch(ds.x_test)
            single = np.stack([client.infer(xi) for xi in ds.x_test[:show]])
        he_costs = _run_costs(client, t0, c0, server_peak_rss_mb(group))
    checks = {"batched": agreement(batched, reference), "single": agreement(single, reference[:show])}
    examples = [{"index": i, "label": int(ds.y_test[i]), "plaintext": int(reference[i].argmax()),
                 "decrypted": int(single[i].argmax()),
                 "max_abs_logit_error": float(np.abs(single[i] - reference[i]).max())} for i in range(show)]
    result = {
        "accuracy": float((batched.argmax(1) == ds.y_test).mean()),
        "costs": he_costs,
        "baseline": {"protocol": "plain_inference", "accuracy": float((plain_logits.argmax(1) == ds.y_test).mean()),
                     "costs": plain_costs},
        "metrics": {"model": plan.model, "activation": plan.activation, **{f"{k}_{m}": v for k, c in checks.items()
                                                                          for m, v in c.items() if m != "n"},
                    "session_key_bytes": session["context_bytes"],
                    "single_latency_s": statistics.median(client.single.latencies),
                    "batch_wall_s": client.batched.latencies[0], "batch_size": batch_size},
        "examples": examples,
    }
    (out_dir / "result_he_inference.json").write_text(json.dumps(result, indent=2))
    return result


def _run_costs(client, t0: float, c0: float, server_rss_mb: float) -> dict:
    """Scorecard costs of one client's run: its bytes; CPU of the client plus the server's reported work."""
    snap = client.meter.snapshot()
    server_s = sum(t.server_s for t in (client.single, client.batched, client.plain))
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0 + server_s
            + client.session.get("server_setup_s", 0.0),
            "bytes_sent": snap["bytes_sent"], "bytes_received": snap["bytes_received"],
            "peak_rss_mb": server_rss_mb}


@register("he_inference")
def run_he(plan, out_dir: Path, **_) -> dict:
    """Encrypted inference (CKKS) of the test set by an HE server process, beside its plain inference API."""
    from securecollab.plans import HEModelPlan

    images = len(plan.load_data().input_shape) == 3
    return run_he_inference(HEModelPlan(model="convnet" if images else "mlp", dataset=plan.dataset,
                                        dataset_path=plan.dataset_path, seed=plan.seed), out_dir)
