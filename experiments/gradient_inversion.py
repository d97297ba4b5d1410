"""Experiment ``gradient_inversion``: how much of the clients' images the aggregator or coordinator recovers, vs N.

Real runs over gRPC, attacked from the adversary's transcript only:

* plain FedAvg: the aggregator inverts each client's update (N = 1); the
  FedSGD run (batch 1, one step per round) also feeds the analytic attack;
* secure aggregation: one run per regime with 16 clients, where clients drop
  out on a schedule (16 -> 8 -> 4 -> 2 clients included), so the coordinator
  sees aggregates of N = 16, 8, 4 and 2 clients in one training run (quick:
  8 -> 4 -> 2). N = 1
  has no secure-aggregation point: the compute parties refuse to aggregate
  one client alone; plain FedAvg's update is what an aggregate of one would
  reveal.

Two regimes: FedSGD (each client one gradient of one image per round) and
FedAvg (each client local epochs over 32 images, batch 8, momentum). In the FedAvg regime plain
FedAvg's update also gets one row per prior of attacks/span_prior.py (the 32 images' input plane).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from attacks.fl_inversion import (
    COORDINATOR,
    PRIOR,
    client_index,
    images_used,
    invert_aggregate,
    invert_fedavg_run,
    invert_secagg_run,
    load_view,
)
from attacks.gradient_inversion import InversionConfig
from attacks.metrics import match_reconstructions
from attacks.registry import run_attack
from attacks.span_prior import PRIORS
from experiments.figures import label_psnr_axes, pyplot, save_figure
from experiments.registry import experiment
from securecollab.plans import FedAvgPlan, SecAggPlan
from securecollab.transcript import Kind
from securecollab.updates import apply_aggregate

LEVELS = (16, 8, 4, 2)


def fedsgd_plan(clients: int, rounds: int, seed: int) -> FedAvgPlan:
    return FedAvgPlan(num_clients=clients, rounds=rounds, samples_per_client=rounds, local_steps=1,
                      batch_size=1, local_epochs=1, lr=0.1, momentum=0.0, seed=seed)


def fedavg_plan(clients: int, rounds: int, seed: int) -> FedAvgPlan:
    return FedAvgPlan(num_clients=clients, rounds=rounds, samples_per_client=32, local_epochs=1,
                      batch_size=8, lr=0.1, momentum=0.9, seed=seed)


def dropout_schedule(rounds_per_level: int, levels=LEVELS) -> dict[str, tuple[str, int]]:
    """Client -> (phase, round) so that rounds include levels[0] clients, then levels[1], ... ."""
    drops = {}
    for level, (keep, start) in enumerate(zip(levels[1:], range(rounds_per_level, 999, rounds_per_level))):
        for c in range(keep, levels[level]):
            drops[f"client-{c}"] = ("before_upload", start)
    return drops


def run_secagg_sweep(plan: FedAvgPlan, out_dir: Path, rounds_per_level: int, progress, *,
                     levels=LEVELS, deadline_s: float = 30.0) -> Path:
    """One secure-aggregation run whose rounds include levels[0], levels[1], ... clients.

    Rounds after a drop wait out the upload deadline (the coordinator cannot tell a
    crashed client from a slow one); a client slower than the deadline in the first
    round is left out of it, so rows are grouped by the N the coordinator really saw."""
    from securecollab.runs import run_protocol
    spec = SecAggPlan(training=plan, min_clients=2, upload_deadline_s=deadline_s)
    progress(f"secure aggregation, {plan.num_clients} clients dropping to {'/'.join(map(str, levels[1:]))}")
    run_protocol("secagg", plan, out_dir, secagg=spec, drops=dropout_schedule(rounds_per_level, levels))
    return out_dir


def reconstruction_grid(run_dir: Path, path: Path, *, n_show: int = 8, iterations: int = 150) -> None:
    """Originals over reconstructions for the first aggregate of each N (the secure-aggregation run)."""
    view = load_view(run_dir, COORDINATOR)
    plan, ds, model, params = view.plan, view.ds, view.model, view.initial
    shown, panels = set(), []
    for rec in view.transcript.of_kind(Kind.AGGREGATE):
        n = len(rec.meta["included"])
        if n not in shown:
            shown.add(n)
            truth = np.concatenate([images_used(plan, client_index(c), rec.round) for c in rec.meta["included"]])
            inv = invert_aggregate(model, dict(params), rec.tensors["aggregate"], list(rec.meta["included"]),
                                   plan, rec.round, ds, InversionConfig(iterations=iterations))
            order = match_reconstructions(inv.images, ds.x_train[truth])
            panels.append((n, ds.x_train[truth][:n_show], inv.images[order][:n_show]))
        params = apply_aggregate(params, rec.tensors["aggregate"])
    fig, axes = pyplot().subplots(2 * len(panels), n_show, figsize=(n_show, 2.1 * len(panels)), squeeze=False)
    for p, (n, originals, recon) in enumerate(sorted(panels)):
        for j in range(n_show):
            for k, img in enumerate((originals, recon)):
                ax = axes[2 * p + k, j]
                ax.axis("off")
                if j < len(img):
                    ax.imshow(np.asarray(img[j]).reshape(8, 8), cmap="gray", vmin=0, vmax=1)
            if j == 0:
                axes[2 * p, 0].set_title(f"N={n}: originals / reconstructions", fontsize=7, loc="left")
    save_figure(fig, path, dpi=110)


def plot_vs_n(rows: list[dict], path: Path) -> None:
    """Median PSNR against N per regime; in the FedSGD regime the optimization alone and with the
    layer-by-layer separation (the N = 1 point of each line is plain FedAvg's single update)."""
    fig, ax = pyplot().subplots(figsize=(5.4, 3.6))
    inversion = [r for r in rows if r["attack"] == "gradient_inversion"]
    lines = (("fedsgd", "none", "o", "FedSGD, optimization"), ("fedsgd", "hidden_span", "D", "FedSGD, + separation"),
             ("fedavg", "none", "s", "FedAvg, optimization"))
    optimized = [r for r in inversion if r["metrics"].get("prior", PRIOR) == PRIOR]
    for regime, separation, marker, label in lines:
        pts = sorted((r["metrics"]["n_clients"], r["metrics"]["psnr_db"]) for r in optimized
                     if r["metrics"].get("regime") == regime
                     and (r["metrics"].get("separation", "none") == separation
                          or (separation != "none" and r["metrics"]["n_clients"] == 1)))
        if len(pts) > 1 or (pts and separation == "none"):
            ax.plot(*zip(*pts), marker=marker, label=f"{label} (N=1: plain FedAvg)")
    for prior, marker in zip(PRIORS, ("^", "v", "P")):  # where the images leave an input plane: N = 1 here
        pts = sorted((r["metrics"]["n_clients"], r["metrics"]["psnr_db"]) for r in inversion
                     if r["metrics"].get("prior") == prior and r["metrics"].get("regime") == "fedavg")
        if pts:
            ax.plot(*zip(*pts), marker=marker, ls=":", label=f"FedAvg, input plane + {prior}")
    base = [r["baseline"]["psnr_db"] for r in inversion]
    if base:
        ax.axhline(float(np.median(base)), color="grey", ls="--", label="mean-image baseline")
    ax.set_xscale("log", base=2)
    label_psnr_axes(ax, xlabel="clients in the aggregate (N)", title="gradient inversion vs N")
    save_figure(fig, path, dpi=110)


@experiment("gradient_inversion", minutes=(4.0, 15.0), attacks=("analytic_fc", "gradient_inversion"),
            summary="gradient inversion of plain FedAvg updates and of secure aggregation's aggregates, "
                    "N in {1,2,4,8,16}, FedSGD and FedAvg regimes")
def sweep(out_dir: Path, *, quick: bool, seed: int, progress, runs=None) -> list[dict]:
    from securecollab.runs import run_protocol

    per_level = 1 if quick else 3
    iterations = 150 if quick else 300
    levels = (8, 4, 2) if quick else LEVELS  # quick: fewer processes, less start-up skew on 2 cores
    rows = []
    # N = 1 from plain FedAvg: >= 50 single images in the full run (4 clients x 13 rounds)
    plain_rounds = 4 if quick else 13
    fedsgd = out_dir / "fedavg_fedsgd"
    progress(f"plain FedAvg, FedSGD: 4 clients x {plain_rounds} rounds of one image")
    run_protocol("fedavg", fedsgd_plan(4, plain_rounds, seed), fedsgd)
    rows += run_attack("analytic_fc", fedsgd)
    progress("inverting each client's update (aggregator)")
    rows += invert_fedavg_run(fedsgd, iterations=iterations)
    fedavg = out_dir / "fedavg_fedavg"
    progress("plain FedAvg, FedAvg regime: 2 clients x 32 images, 1 round")
    run_protocol("fedavg", fedavg_plan(2, 1, seed), fedavg)
    rows += invert_fedavg_run(fedavg, iterations=iterations)
    for regime, make in (("fedsgd", fedsgd_plan), ("fedavg", fedavg_plan)):
        run_dir = out_dir / f"secagg_{regime}"
        run_secagg_sweep(make(levels[0], per_level * len(levels), seed), run_dir, per_level, progress,
                         levels=levels, deadline_s=10.0 if quick else 30.0)
        progress(f"inverting the revealed aggregates ({regime}; the FedAvg regime unrolls N x 32 images)")
        rows += invert_secagg_run(run_dir, iterations=iterations if regime == "fedsgd" else iterations // 2)
        if regime == "fedsgd":
            reconstruction_grid(run_dir, out_dir / "reconstructions_secagg_fedsgd.png", iterations=iterations)
    plot_vs_n(rows, out_dir / "leakage_vs_n.png")
    for r in rows:
        if r["attack"] == "gradient_inversion":
            r["figure"] = "leakage_vs_n.png"
    (out_dir / "rows.json").write_text(json.dumps(rows, indent=1))
    return rows
