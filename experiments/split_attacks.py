"""Experiment ``split_attacks``: what the split-learning server learns, per cut and per defence.

Real runs (a server process and client processes over gRPC with mutual TLS),
then the server's attacks on its own transcripts:

* vanilla runs per cut of the MLP and per defence (none, Gaussian noise on the
  activations, NoPeek): activation inversion (decoder, optimization), beside
  the run's test accuracy -- the price of the defence;
* U-shaped runs (labels stay on the client) per defence: label leakage from the
  gradients the client returns, and activation inversion too;
* one ``per_client`` run (full only): the server never sees client weights and
  attacks through a clone of the bottom.

Figures: ``split_reconstructions.png`` (originals vs reconstructions per
configuration) and ``split_leakage.png`` (leakage and accuracy per cut/defence).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from attacks.activation_inversion import invert_activations, rows_for, score
from attacks.label_leakage import label_leakage
from attacks.split_view import SERVER, describe_defence, load_server_view, save_plan, split_plan
from experiments.figures import pyplot, save_figure
from experiments.registry import experiment
from securecollab.plans import SplitPlan
from securecollab.transcript import load_transcript

# Four clients (as the demo): with two or three, a shard of the 1,347 digits leaves a last batch of one
# example, on which NoPeek's distance correlation has a non-finite gradient and the client fails.
CLIENTS = 4
QUICK_NOISE, QUICK_NOPEEK = 1.0, 1.0
FULL_NOISE, FULL_NOPEEK = (0.5, 1.0, 2.0), (0.5, 1.0, 2.0)
GRID_IMAGES = 8


def configurations(quick: bool, seed: int) -> list[SplitPlan]:
    """The runs of the sweep: vanilla per cut x defence, U-shaped per defence, (full) one per-client run."""
    base = SplitPlan(num_clients=CLIENTS, epochs=5 if quick else 15, seed=seed)
    cuts = list(base.build_model().cut_points)
    if quick:
        defences = [{}, {"noise_sigma": QUICK_NOISE}, {"nopeek_alpha": QUICK_NOPEEK}]
        vanilla = [replace(base, cut=cuts[0], **d) for d in defences] + [replace(base, cut=c) for c in cuts[1:]]
        ushaped = [replace(base, cut=cuts[0], mode="ushaped", epochs=3)]
        return vanilla + ushaped
    defences = [{}, *({"noise_sigma": s} for s in FULL_NOISE), *({"nopeek_alpha": a} for a in FULL_NOPEEK)]
    vanilla = [replace(base, cut=c, **d) for c in cuts for d in defences]
    ushaped = [replace(base, cut=cuts[0], mode="ushaped", **d) for d in defences]
    return vanilla + ushaped + [replace(base, cut=cuts[0], client_weights="per_client")]


def label(plan: SplitPlan) -> str:
    d = describe_defence(plan)
    defence = {"none": "none", "noise": f"noise {plan.noise_sigma:g}", "nopeek": f"nopeek {plan.nopeek_alpha:g}"
               }.get(d["defence"], d["defence"])
    extra = "" if plan.mode == "vanilla" else " U"
    extra += "" if plan.client_weights == "handoff" else " clone"
    return f"{(plan.cut or '').replace('after_', '')} / {defence}{extra}"


def _reusable(run_dir: Path | None, plan: SplitPlan) -> bool:
    """A finished run (e.g. the demo's) that is this configuration, with a plan the attacks can read."""
    if run_dir is None or not (Path(run_dir) / "result_split.json").exists():
        return False
    try:
        view = load_server_view(run_dir)
    except (ValueError, OSError):
        return False
    have = replace(view.plan, epochs=plan.epochs, cut=view.plan.cut or plan.cut, record_transcripts=True)
    return have == plan


def run_configuration(plan: SplitPlan, run_dir: Path, progress) -> float:
    """Start the real split run (server and clients over gRPC); returns its test accuracy."""
    from securecollab.plans import FedAvgPlan
    from securecollab.runs import run_protocol
    result = run_protocol("split", FedAvgPlan(), run_dir, split=plan)
    save_plan(run_dir, plan)
    progress(f"split run {label(plan)}: accuracy {result['accuracy']:.3f}")
    return float(result["accuracy"])


def attack_run(plan: SplitPlan, run_dir: Path, accuracy: float, *, quick: bool, seed: int) -> tuple[list, dict]:
    """Rows of both attacks on one run, and a few reconstructions for the grid."""
    view = load_server_view(run_dir, plan)
    ds = plan.load_data()
    result = invert_activations(view, ds, run_dir, n_images=64 if quick else 192, seed=seed,
                                decoder_steps=800 if quick else 1500, iterations=250 if quick else 400)
    rows = rows_for(view, score(result, ds, seed), result["knowledge"], accuracy=accuracy)
    rows += label_leakage(run_dir, plan=plan, seed=seed, accuracy=accuracy)
    grid = {"originals": ds.x_train[result["sources"][:GRID_IMAGES]],
            **{m: r[:GRID_IMAGES] for m, r in result["reconstructions"].items()}}
    return rows, grid


@experiment("split_attacks", minutes=(3.0, 15.0), attacks=("activation_inversion", "label_leakage"),
            summary="split learning: the server inverts cut activations per cut and defence (noise, NoPeek), "
                    "and reads U-shaped labels off the returned gradients")
def split_attacks(out_dir: Path, *, quick: bool, seed: int, progress, runs: dict | None = None) -> list[dict]:
    out_dir = Path(out_dir)
    rows, grids = [], []
    plans = configurations(quick, seed)
    for i, plan in enumerate(plans):
        given = (runs or {}).get("split")
        if i == 0 and _reusable(given, plan):
            run_dir = Path(given)
            recorded = split_plan(run_dir, transcript=load_transcript(run_dir / "transcripts" / f"{SERVER}.jsonl"))
            plan = replace(recorded, cut=recorded.cut or plan.cut)  # the model's default cut, named
            accuracy = float(json.loads((run_dir / "result_split.json").read_text())["accuracy"])
            progress(f"split run {label(plan)}: reusing {run_dir}")
        else:
            run_dir = out_dir / "runs" / f"split-{i:02d}"
            accuracy = run_configuration(plan, run_dir, progress)
        new, grid = attack_run(plan, run_dir, accuracy, quick=quick, seed=seed)
        progress(f"attacked {label(plan)} ({i + 1}/{len(plans)})")
        rows += new
        grids.append((label(plan), grid))
    plot_reconstructions(grids, out_dir / "split_reconstructions.png")
    plot_leakage(rows, out_dir / "split_leakage.png")
    for r in rows:
        r["figure"] = "split_reconstructions.png" if r["attack"] == "activation_inversion" else "split_leakage.png"
    return rows


# --- figures ----------------------------------------------------------------------------------------

def plot_reconstructions(grids: list[tuple[str, dict]], path: Path) -> None:
    """Per configuration, three rows: originals, decoder, optimization."""
    n_rows = sum(len(g) for _, g in grids)
    fig, axes = pyplot().subplots(n_rows, GRID_IMAGES, figsize=(GRID_IMAGES * 0.8, n_rows * 0.85), squeeze=False)
    r = 0
    for name, grid in grids:
        for kind, images in grid.items():
            for j in range(GRID_IMAGES):
                ax = axes[r, j]
                ax.set_xticks([])
                ax.set_yticks([])
                if j < len(images):
                    ax.imshow(np.asarray(images[j]).reshape(images.shape[-2:]), cmap="gray", vmin=0, vmax=1)
            axes[r, 0].set_ylabel(f"{name}\n{kind}" if kind == "originals" else kind, fontsize=6, rotation=0,
                                  ha="right", va="center")
            r += 1
    fig.suptitle("split server: activation inversion (last epoch)", fontsize=9)
    save_figure(fig, path, dpi=110)


def _config_name(m: dict) -> str:
    defence = {"none": "none", "noise": f"noise {m['noise_sigma']:g}",
               "nopeek": f"nopeek {m['nopeek_alpha']:g}"}.get(m["defence"], m["defence"])
    tag = "" if m["client_weights"] == "handoff" else " clone"
    return f"{m['cut'].replace('after_', '')} / {defence}{tag}"


def plot_leakage(rows: list[dict], path: Path) -> None:
    """Left: inversion PSNR (and the mean-image baseline) with the run's accuracy. Right: U-shaped label AUC."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    inv = [r for r in rows if r["attack"] == "activation_inversion" and r["metrics"]["mode"] == "vanilla"]
    names = list(dict.fromkeys(_config_name(r["metrics"]) for r in inv))
    x = np.arange(len(names))
    for k, method in enumerate(("decoder", "optimization")):
        vals = {_config_name(r["metrics"]): r for r in inv if r["metrics"]["method"] == method}
        left.bar(x + (k - 0.5) * 0.38, [vals[n]["metrics"]["psnr_db"] for n in names], 0.38, label=method)
    base = {_config_name(r["metrics"]): r["baseline"]["psnr_db"] for r in inv}
    left.plot(x, [base[n] for n in names], "k_", markersize=22, mew=2, label="mean-image baseline")
    left.set_xticks(x, names, rotation=30, ha="right", fontsize=7)
    left.set_ylabel("PSNR of reconstructions (dB)")
    acc_axis = left.twinx()
    acc = {_config_name(r["metrics"]): r["metrics"]["accuracy"] for r in inv}
    acc_axis.plot(x, [acc[n] for n in names], "o--", color="tab:red", label="test accuracy")
    acc_axis.set_ylim(0, 1)
    acc_axis.set_ylabel("test accuracy of the run", color="tab:red")
    left.legend(loc="lower left", fontsize=7)
    left.set_title("activation inversion by the server (vanilla)", fontsize=9)
    lab = [r for r in rows if r["attack"] == "label_leakage" and r["metrics"]["mode"] == "ushaped"]
    methods = list(dict.fromkeys(r["metrics"]["method"] for r in lab))
    configs = list(dict.fromkeys(_config_name(r["metrics"]) for r in lab))
    xc = np.arange(len(configs))
    width = 0.8 / max(len(methods), 1)
    for k, method in enumerate(methods):
        sel = {_config_name(r["metrics"]): r["metrics"] for r in lab if r["metrics"]["method"] == method}
        vals = np.array([sel[c]["auc"] for c in configs])
        err = np.array([[v - sel[c]["auc_ci"][0], sel[c]["auc_ci"][1] - v] for c, v in zip(configs, vals)]).T
        right.bar(xc + (k - (len(methods) - 1) / 2) * width, vals, width, yerr=err, label=method, capsize=2)
    right.axhline(0.5, color="k", linestyle=":", label="chance (0.5)")
    right.set_xticks(xc, configs, rotation=30, ha="right", fontsize=7)
    right.set_ylim(0, 1.05)
    right.set_ylabel("macro one-vs-rest AUC")
    right.legend(fontsize=7, loc="lower right")
    right.set_title("label leakage, U-shaped (labels kept home)", fontsize=9)
    save_figure(fig, path, dpi=110)
