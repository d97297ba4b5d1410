"""Experiment ``extraction``: query a real HE server process or MPC deployment, then extract its model.

For each served model -- ``linear`` (equation solving) and ``convnet`` (the
HE default; distillation) -- the experiment trains the target, starts the HE
server process (mutual TLS on loopback), and acts as one client that opens a
CKKS session and sends batched encrypted queries; for the MPC convnet (ReLU)
it starts a label-only model-private deployment (a dealer and three compute
parties, the owner's upload) and sends secret-shared queries in batches of
at most the plan's ``max_batch``:

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
for why it is not enforceable against an HE key holder). The MPC client
only ever receives labels: its rows are the label-only defence enforced.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import numpy as np

from attacks.extraction import PLAN_FILE, DistillConfig, one_thread, random_queries
from attacks.extraction import run as extraction_attack
from attacks.extraction_view import record_query
from experiments.figures import pyplot, save_figure
from experiments.registry import experiment

FIGURE = "extraction_fidelity.png"
QUICK_BUDGETS = (50, 100, 200, 400, 800)
FULL_BUDGETS = (25, 50, 100, 200, 400, 800, 1200)
# linear on 8x8 digits: d + 1 = 65 unknowns per class; budgets straddle it
QUICK_LINEAR_BUDGETS = (33, 65, 130)
FULL_LINEAR_BUDGETS = (17, 33, 49, 65, 130, 260)


def _queries(ds, *, aux_queries: int, random_count: int, seed: int) -> list[tuple]:
    """(source, inputs, own labels or None): a seeded sample of the training split, and uniform random inputs."""
    pick = np.random.default_rng(seed).permutation(len(ds.x_train))[:aux_queries]
    return [("aux", ds.x_train[pick], ds.y_train[pick]),
            ("random", random_queries(random_count, ds.input_shape, seed=seed + 1), None)]


def _declare(work: Path, plan, protocol: str, client: str, *, aux_queries: int, random_count: int, seed: int) -> Path:
    """The attacker's declared knowledge beside its transcript (``extraction.json``): the run directory."""
    (work / PLAN_FILE).write_text(json.dumps({
        "protocol": protocol, "plan": plan.to_json(), "client": client,
        "aux": f"{aux_queries} examples of the plan's training split (seeded permutation, seed {seed})",
        "random": f"{random_count} uniform inputs on [0, 1]", "eval": "the plan's test split (never queried)"}))
    return work


def serve_and_query(plan, work: Path, *, aux_queries: int, random_count: int, seed: int, progress) -> Path:
    """Train and serve ``plan``'s model, query it as one HE client, and leave a run directory for the attack."""
    from securecollab.launch import ProcessGroup
    from securecollab.net.certs import TlsFiles
    from securecollab.runs.inference import CLIENT, prepare, start_server
    from securecollab.transcript import TranscriptRecorder
    from services.he_client import HEClient

    work.mkdir(parents=True, exist_ok=True)
    with one_thread():  # from a secret seed, as the MPC owner's: the plan alone must not give the adversary the model
        _, ds, weights, certs = prepare(plan, work, seed=secrets.randbits(31))
    sent = _queries(ds, aux_queries=aux_queries, random_count=random_count, seed=seed)
    batch = int(min(4096, max(aux_queries, random_count)))
    recorder = TranscriptRecorder(work / "transcripts" / f"{CLIENT}.jsonl", party=CLIENT, role="client")
    with ProcessGroup(work / "logs") as group:
        port = start_server(group, plan, weights, certs, None, max_batch=batch)
        with HEClient(f"localhost:{port}", tls=TlsFiles.for_party(certs, CLIENT), party_id=CLIENT,
                      transcript=recorder) as client:
            progress(f"extraction: {plan.model} served; opening a CKKS session (batches of {batch})")
            client.open_session(batch_size=batch)
            for source, x, y in sent:
                if len(x):
                    record_query(recorder, x, source=source, labels=y)
                    client.infer_batch(x)
            progress(f"extraction: {plan.model}: {aux_queries} auxiliary + {random_count} random encrypted queries "
                     f"answered in {client.batched.rpc_s:.1f}s")
    return _declare(work, plan, "he_inference", CLIENT, aux_queries=aux_queries, random_count=random_count,
                    seed=seed)


def serve_and_query_mpc(plan, work: Path, *, aux_queries: int, random_count: int = 0, seed: int, progress) -> Path:
    """Train ``plan``'s (an MpcInferencePlan) model, deploy it over a dealer and the compute parties, query it as
    one MPC client in batches of at most ``plan.max_batch``, and leave a run directory for the attack."""
    from securecollab.runs.mpc_inference import CLIENT, client, deployment, infer_all, prepare

    work.mkdir(parents=True, exist_ok=True)
    with one_thread():
        model, ds, certs = prepare(plan, work)   # the owner's weights, saved as mpc_model.npz (scoring only)
    sent = _queries(ds, aux_queries=aux_queries, random_count=random_count, seed=seed)
    progress(f"extraction: MPC {plan.model} ({plan.output} deployment): starting the dealer and "
             f"{plan.n_parties} compute parties")
    with deployment(plan, work, model, certs) as targets, client(targets, certs, work, CLIENT) as c:
        for source, x, y in sent:
            if len(x):
                record_query(c.transcript, x, source=source, labels=y)  # the same file the client records into
                infer_all(c, x, plan.max_batch)
        progress(f"extraction: MPC {plan.model}: {aux_queries} auxiliary + {random_count} random secret-shared "
                 f"queries answered ({plan.output}) in {c.timings.rpc_s:.1f}s")
    return _declare(work, plan, "mpc_inference", CLIENT, aux_queries=aux_queries, random_count=random_count,
                    seed=seed)


SERVICE = {"he_inference": "HE", "mpc_inference": "MPC"}


def _series(r: dict) -> str:
    """A row's line in the figure: which service, what the client saw (and whether the service enforced it)."""
    m, service = r["metrics"], SERVICE[r["protocol"]]
    view = m["output"] if m["output"] == "logits" else \
        f"label-only ({'enforced' if m.get('enforced') else 'not enforced'})"
    return f"{service} {view}, {m['source']} queries ({m['method'].replace('_', ' ')})"


def _plot(rows: list[dict], path: Path) -> None:
    """One panel per served architecture; HE solid, MPC dashed; each target's own no-query baseline."""
    models = sorted({r["metrics"]["model"] for r in rows})
    colours = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(_series(r) for r in rows))}  # one per series
    fig, axes = pyplot().subplots(1, len(models), figsize=(6.0 * len(models), 4.4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["metrics"]["model"] == model]
        series: dict[str, list] = {}
        for r in mine:
            m = r["metrics"]
            series.setdefault(_series(r), []).append((m["queries"], m["fidelity"], m["fidelity_ci"]))
        for label, points in series.items():
            q, f, ci = zip(*sorted(points))
            lo, hi = zip(*ci)
            mpc = label.startswith("MPC")
            ax.plot(q, f, marker="s" if mpc else "o", ls="--" if mpc else "-", color=colours[label], label=label)
            ax.fill_between(q, lo, hi, color=colours[label], alpha=0.15)
        protocols = sorted({r["protocol"] for r in mine})
        for protocol, colour in zip(protocols, ("k", "tab:gray")):
            own = [r for r in mine if r["protocol"] == protocol]
            target = f"{SERVICE[protocol]} target, {own[0]['metrics']['activation']}"
            base = sorted({(r["metrics"]["queries"], r["baseline"]["fidelity"]) for r in own
                           if "fidelity" in r["baseline"]})
            if base:
                q, f = zip(*base)
                ax.plot(q, f, color=colour, ls=":", marker="x",
                        label=f"no queries: student on that many own labelled aux examples ({target})")
            majority = [r["baseline"]["majority_fidelity"] for r in own if "majority_fidelity" in r["baseline"]]
            if majority:
                ax.axhline(float(np.mean(majority)), color=colour, lw=0.8, ls="-.",
                           label=f"majority class ({target})")
        ax.set_xscale("log")
        ticks = sorted({r["metrics"]["queries"] for r in mine})
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
        ax.minorticks_off()
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("queries to the inference service")
        ax.set_ylabel("fidelity (argmax agreement, held-out test set)")
        ax.set_title(f"extracting the served {model}")
        ax.legend(fontsize=6, loc="lower right")
    save_figure(fig, path, dpi=120)


@experiment("extraction", summary="model extraction by a querying HE or MPC client: fidelity vs queries, "
            "linear (equation solving) and convnet (distillation), logits vs label-only (enforced by MPC)",
            minutes=(2.0, 7.0), attacks=("extraction",))
def extraction_experiment(out_dir: Path, *, quick: bool, seed: int, progress, runs=None) -> list[dict]:
    """Real HE server + client queries for the linear model and the convnet, and a label-only MPC deployment of
    the convnet queried with the same auxiliary inputs; rows for every budget and view.

    The demo's own he_inference run (``runs``) queries the test set without
    recording its inputs, so it is not reused: this experiment makes its own.
    """
    from securecollab.plans import HEModelPlan, MpcInferencePlan

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
    # the label-only defence enforced: the MPC parties compute the argmax, the client never holds logits
    mpc_dir = serve_and_query_mpc(MpcInferencePlan(model="convnet", output="label", seed=seed),
                                  out_dir / "runs" / "extraction_mpc_convnet", aux_queries=top, seed=seed,
                                  progress=progress)
    rows += extraction_attack(mpc_dir, budgets=budgets, output="label", source="aux", config=config,
                              baseline_cache={}, progress=progress)
    _plot(rows, out_dir / FIGURE)
    return [{**r, "figure": FIGURE} for r in rows]
