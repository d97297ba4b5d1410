"""Experiment ``extraction``: query a real HE server process, then extract its model from the answers.

For each served model -- ``linear`` (equation solving) and ``convnet`` (the
HE default; distillation) -- the experiment trains the target, starts the HE
server process (mutual TLS on loopback), and acts as one client that opens a
CKKS session and sends batched encrypted queries:

* auxiliary queries: a seeded sample of the data set's training split (the
  attacker's own in-distribution data; here it happens to overlap the
  target's training data, which does not matter for fidelity, measured on
  the test split that no query touches), with their true labels kept
  aside for the no-query baseline;
* random queries: uniform inputs over the pixel range (no data needed).

The client records each query itself (kind ``Kind.QUERY``) next to the
decrypted answers the client library records, and the ``extraction`` attack
then reads that transcript for nested query budgets, with the full logits
and with the label-only view (the defence's effect; see attacks.extraction
for why it is not enforceable against a key holder).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from attacks.extraction import PLAN_FILE, DistillConfig, one_thread, random_queries, record_query
from attacks.extraction import run as extraction_attack
from experiments.figures import pyplot, save_figure
from experiments.registry import experiment

FIGURE = "extraction_fidelity.png"
QUICK_BUDGETS = (50, 100, 200, 400, 800)
FULL_BUDGETS = (25, 50, 100, 200, 400, 800, 1200)
# linear on 8x8 digits: d + 1 = 65 unknowns per class; budgets straddle it
QUICK_LINEAR_BUDGETS = (33, 65, 130)
FULL_LINEAR_BUDGETS = (17, 33, 49, 65, 130, 260)


def serve_and_query(plan, work: Path, *, aux_queries: int, random_count: int, seed: int, progress) -> Path:
    """Train and serve ``plan``'s model, query it as one HE client, and leave a run directory for the attack."""
    from securecollab.launch import ProcessGroup
    from securecollab.net.certs import TlsFiles
    from securecollab.runs.inference import CLIENT, prepare, start_server
    from securecollab.transcript import TranscriptRecorder
    from services.he_client import HEClient

    work.mkdir(parents=True, exist_ok=True)
    with one_thread():
        _, ds, weights, certs = prepare(plan, work)
    pick = np.random.default_rng(seed).permutation(len(ds.x_train))[:aux_queries]
    aux_x, aux_y = ds.x_train[pick], ds.y_train[pick]
    rand_x = random_queries(random_count, ds.input_shape, seed=seed + 1)
    batch = int(min(4096, max(aux_queries, random_count)))
    recorder = TranscriptRecorder(work / "transcripts" / f"{CLIENT}.jsonl", party=CLIENT, role="client")
    with ProcessGroup(work / "logs") as group:
        port = start_server(group, plan, weights, certs, None, max_batch=batch)
        with HEClient(f"localhost:{port}", tls=TlsFiles.for_party(certs, CLIENT), party_id=CLIENT,
                      transcript=recorder) as client:
            progress(f"extraction: {plan.model} served; opening a CKKS session (batches of {batch})")
            client.open_session(batch_size=batch)
            for source, x, y in (("aux", aux_x, aux_y), ("random", rand_x, None)):
                if len(x):
                    record_query(recorder, x, source=source, labels=y)
                    client.infer_batch(x)
            progress(f"extraction: {plan.model}: {len(aux_x)} auxiliary + {len(rand_x)} random encrypted queries "
                     f"answered in {client.batched.rpc_s:.1f}s")
    (work / PLAN_FILE).write_text(json.dumps({
        "plan": plan.to_json(), "client": CLIENT,
        "aux": f"{aux_queries} examples of the plan's training split (seeded permutation, seed {seed})",
        "random": f"{random_count} uniform inputs on [0, 1]", "eval": "the plan's test split (never queried)"}))
    return work


def _plot(rows: list[dict], path: Path) -> None:
    models = sorted({r["metrics"]["model"] for r in rows})
    fig, axes = pyplot().subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["metrics"]["model"] == model]
        series: dict[str, list] = {}
        for r in mine:
            m = r["metrics"]
            series.setdefault(f"{m['output']}, {m['source']} queries ({m['method'].replace('_', ' ')})", []).append(
                (m["queries"], m["fidelity"], m["fidelity_ci"]))
        base = sorted({(r["metrics"]["queries"], r["baseline"]["fidelity"]) for r in mine
                       if "fidelity" in r["baseline"]})
        for label, points in series.items():
            q, f, ci = zip(*sorted(points))
            lo, hi = zip(*ci)
            ax.plot(q, f, marker="o", label=label)
            ax.fill_between(q, lo, hi, alpha=0.15)
        if base:
            q, f = zip(*base)
            ax.plot(q, f, "k--", marker="x", label="no queries: student on that many own labelled aux examples")
        majority = [r["baseline"].get("majority_fidelity") for r in mine if "majority_fidelity" in r["baseline"]]
        if majority:
            ax.axhline(float(np.mean(majority)), color="grey", lw=0.8, ls=":", label="majority class")
        ax.set_xscale("log")
        ticks = sorted({r["metrics"]["queries"] for r in mine})
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
        ax.minorticks_off()
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("queries to the HE service")
        ax.set_ylabel("fidelity (argmax agreement, held-out test set)")
        ax.set_title(f"extracting the served {model}")
        ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path, dpi=120)


@experiment("extraction", summary="model extraction by a querying HE client: fidelity vs queries, "
            "linear (equation solving) and convnet (distillation), logits vs label-only",
            minutes=(1.5, 6.0), attacks=("extraction",))
def extraction_experiment(out_dir: Path, *, quick: bool, seed: int, progress, runs=None) -> list[dict]:
    """Real HE server + client queries for the linear model and the convnet; rows for every budget and view.

    The demo's own he_inference run (``runs``) queries the test set without
    recording its inputs, so it is not reused: this experiment makes its own.
    """
    from securecollab.plans import HEModelPlan

    budgets = QUICK_BUDGETS if quick else FULL_BUDGETS
    config = DistillConfig(steps=600 if quick else 1500, seed=seed)
    linear_budgets = QUICK_LINEAR_BUDGETS if quick else FULL_LINEAR_BUDGETS
    top = max(budgets)
    rows: list[dict] = []
    linear_dir = serve_and_query(HEModelPlan(model="linear", seed=seed), out_dir / "runs" / "extraction_linear",
                                 aux_queries=top, random_count=max(linear_budgets), seed=seed, progress=progress)
    cache: dict = {}
    common = dict(config=config, baseline_cache=cache, progress=progress)
    rows += extraction_attack(linear_dir, budgets=linear_budgets, output="logits", source="random", **common)
    rows += extraction_attack(linear_dir, budgets=budgets, output="logits", source="aux", **common)
    rows += extraction_attack(linear_dir, budgets=budgets, output="label", source="aux", **common)
    conv_dir = serve_and_query(HEModelPlan(model="convnet", seed=seed), out_dir / "runs" / "extraction_convnet",
                               aux_queries=top, random_count=top, seed=seed, progress=progress)
    cache = {}
    common = dict(config=config, baseline_cache=cache, progress=progress)
    rows += extraction_attack(conv_dir, budgets=budgets, output="logits", source="aux", **common)
    rows += extraction_attack(conv_dir, budgets=budgets, output="label", source="aux", **common)
    rows += extraction_attack(conv_dir, budgets=budgets, output="logits", source="random", **common)
    _plot(rows, out_dir / FIGURE)
    return [{**r, "figure": FIGURE} for r in rows]
