"""Experiment ``dp``: gradient inversion by the FedAvg aggregator when clients train with DP-SGD, vs epsilon.

Real plain-FedAvg runs (4 client processes) in which each client holds one
image and takes one DP-SGD step on it per round (per-example clipping to
``clip``, Gaussian noise ``noise * clip``; opacus): the FedSGD regime (one
step, one image), the attacker's best case, so the defence is measured
against the leakage it has to stop. The aggregator inverts each
update it received, exactly as without DP (it knows the plan, not the noise,
which the clients draw from OS entropy), and we report its success against
the clients' epsilon (delta = 1e-5, RDP accounting over all rounds).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from attacks.fl_inversion import invert_fedavg_run
from experiments.figures import label_psnr_axes, pyplot, save_figure
from experiments.registry import experiment
from securecollab.plans import FedAvgPlan


def dp_plan(noise: float, rounds: int, seed: int, clip: float = 1.0) -> FedAvgPlan:
    return FedAvgPlan(num_clients=4, rounds=rounds, samples_per_client=1, batch_size=1, local_epochs=1,
                      lr=0.1, momentum=0.0, seed=seed, dp_noise_multiplier=noise, dp_max_grad_norm=clip)


def plot_vs_epsilon(rows: list[dict], path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(5, 3.4))
    dp = sorted((r["metrics"]["epsilon"], r["metrics"]["psnr_db"]) for r in rows
                if r["metrics"]["noise_multiplier"] and r["metrics"]["epsilon"] is not None)
    if dp:
        ax.plot(*zip(*dp), marker="o", label="DP-SGD")
    plain = [r["metrics"]["psnr_db"] for r in rows if not r["metrics"]["noise_multiplier"]]
    if plain:
        ax.axhline(plain[0], color="C3", ls=":", label="no DP")
    ax.axhline(rows[0]["baseline"]["psnr_db"], color="grey", ls="--", label="mean-image baseline")
    ax.set_xscale("log")
    label_psnr_axes(ax, xlabel="epsilon per client (delta = 1e-5)",
                    title="gradient inversion of FedAvg updates vs DP-SGD epsilon")
    save_figure(fig, path, dpi=110)


@experiment("dp", minutes=(2.0, 5.0), attacks=("gradient_inversion",),
            summary="DP-SGD local training (opacus) as a defence: gradient inversion of FedAvg updates vs epsilon")
def sweep(out_dir: Path, *, quick: bool, seed: int, progress, runs=None) -> list[dict]:
    from securecollab.runs import run_protocol

    # per-example noise on one image: even sigma = 0.1 (epsilon ~ 10^2) already ruins the inversion
    noises = (0.0, 0.003, 0.03, 1.0) if quick else (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 1.0)
    rounds = 2 if quick else 3
    rows = []
    for noise in noises:
        plan = dp_plan(noise, rounds, seed)
        run_dir = out_dir / f"fedavg_noise_{noise:g}"
        progress(f"plain FedAvg, 4 clients, DP-SGD noise multiplier {noise:g}, clip 1")
        result = run_protocol("fedavg", plan, run_dir)
        epsilon = plan.dp_epsilon(1)
        epsilon = epsilon if epsilon is not None and math.isfinite(epsilon) else None  # JSON: none = unbounded
        progress(f"inverting the updates (epsilon {epsilon if epsilon is not None else 'inf'})")
        (r,) = invert_fedavg_run(run_dir, iterations=150 if quick else 300)
        r["metrics"].update({"epsilon": epsilon, "noise_multiplier": noise, "clip": plan.dp_max_grad_norm,
                             "delta": plan.dp_delta, "model_accuracy": result["accuracy"]})
        r["figure"] = "leakage_vs_epsilon.png"
        rows.append(r)
    plot_vs_epsilon(rows, out_dir / "leakage_vs_epsilon.png")
    (out_dir / "rows.json").write_text(json.dumps(rows, indent=1))
    return rows
