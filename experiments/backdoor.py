"""Experiment ``backdoor``: malicious clients against plain FedAvg and secure aggregation, with and without
a defence: a norm bound that rejects or clips, or FLTrust's trust scores (in the clear at the FedAvg
aggregator: update analysis; inside MPC under secure aggregation).

Real runs: 10 client processes on digits (the default MLP, 10 rounds), the first `k` of them malicious
(securecollab.poisoning). A model-replacement backdoor acts in the last round (Bagdasaryan et al. 2020:
its update boosted by n / k); the adaptive backdoor acts every round, scaled to just inside the bound it
knows; the wrap-around update is the one crafted against a bare in-MPC norm check. Each row is read off the
malicious client's own transcript (attacks/poisoning.py) beside the clean run (no malicious client).

The bound, 4.0, is above every honest delta's norm in these runs (1.0 to 3.2 over the rounds) and far
below a boosted one's (~30). FLTrust's root data set: 100 training examples the coordinator holds.
"""

from __future__ import annotations

import json
from pathlib import Path

from attacks.poisoning import backdoor, model_poisoning
from experiments.figures import pyplot, save_figure
from experiments.registry import experiment
from securecollab.plans import FedAvgPlan, SecAggPlan
from securecollab.poisoning import BEHAVIOURS, Malice, discover

BOUND = 4.0
N_CLIENTS, ROUNDS = 10, 10
TARGET, POISON_FRACTION = 0, 0.3


def malice(behaviour: str, k: int) -> Malice:
    if behaviour == "model_replacement":
        return Malice(behaviour, factor=N_CLIENTS / k, target=TARGET, poison_fraction=POISON_FRACTION,
                      from_round=ROUNDS - 1)
    if behaviour == "adaptive":
        return Malice(behaviour, factor=N_CLIENTS / k, target=TARGET, poison_fraction=POISON_FRACTION, bound=BOUND)
    return Malice(behaviour, target=TARGET, poison_fraction=POISON_FRACTION, from_round=ROUNDS - 1)


DEFENCES = ("none", "reject", "clip", "fltrust")


def cases(quick: bool) -> list[tuple[str, str, str, int]]:
    """(protocol, behaviour, defence, malicious clients): each one real run."""
    quick_cases = [("fedavg", "model_replacement", "none", 1), ("fedavg", "model_replacement", "reject", 1),
                   ("secagg", "none", "reject", 0), ("secagg", "model_replacement", "reject", 1),
                   ("secagg", "adaptive", "reject", 1), ("fedavg", "wraparound", "none", 1),
                   ("secagg", "model_replacement", "clip", 1), ("secagg", "model_replacement", "fltrust", 1)]
    if quick:
        return quick_cases
    more = [("secagg", "wraparound", "reject", 1), ("secagg", "model_replacement", "none", 1),
            ("fedavg", "model_replacement", "clip", 1), ("fedavg", "model_replacement", "fltrust", 1),
            ("secagg", "none", "fltrust", 0), ("secagg", "adaptive", "clip", 1)]
    more += [(p, b, defence, 1) for b in ("sign_flip", "scale", "random") for p, defence in
             (("fedavg", "none"), ("secagg", "reject"), ("secagg", "fltrust"))]
    more += [(p, "model_replacement", defence, k) for k in (2, 3)
             for p, defence in (("fedavg", "none"), ("secagg", "reject"), ("secagg", "fltrust"))]
    return quick_cases + more


def defence_label(defence: str) -> str:
    return {"none": "none", "reject": f"norm_bound({BOUND:g})", "clip": f"clip({BOUND:g})", "fltrust": "fltrust"}[defence]


def run_case(out_dir: Path, protocol: str, behaviour: str, defence: str, k: int, seed: int) -> tuple[Path, Malice | None]:
    from securecollab.runs import run_protocol

    m = malice(behaviour, k) if k else None
    rule = {"norm_bound": BOUND if defence in ("reject", "clip") else 0.0,
            "norm_mode": "clip" if defence == "clip" else "reject", "robust": "fltrust" if defence == "fltrust" else ""}
    plan = FedAvgPlan(num_clients=N_CLIENTS, rounds=ROUNDS, seed=seed, **(rule if protocol == "fedavg" else {}))
    run_dir = out_dir / f"{protocol}_{behaviour}_k{k}_{defence}"
    options = {"malicious": {f"client-{i}": m for i in range(k)}} if k else {}
    if protocol == "secagg":
        options["secagg"] = SecAggPlan(training=plan, **rule)
    run_protocol(protocol, plan, run_dir, **options)
    return run_dir, m


def plot(rows: list[dict], path: Path) -> None:
    """Every backdoor row as a pair of bars (ASR, main accuracy); model replacement's ASR against the
    malicious fraction per protocol and defence (when the sweep has several fractions); the adaptive
    backdoor's ASR after each round."""
    backdoors = [r for r in rows if r["attack"] == "backdoor"]
    replacement = [r for r in backdoors if r["metrics"]["behaviour"] == "model_replacement"]
    fractions = sorted({r["metrics"]["malicious_fraction"] for r in replacement})
    panels = 3 if len(fractions) > 1 else 2
    fig, axes = pyplot().subplots(1, panels, figsize=(6 * panels, max(3.8, 0.32 * len(backdoors) + 1.2)),
                                  gridspec_kw={"width_ratios": [1.4] + [1] * (panels - 1)})
    bars, by_round = axes[0], axes[-1]
    labels = [f"{r['protocol']} · {r['metrics']['behaviour']} · {r['metrics']['defence']} · "
              f"{r['metrics']['malicious_fraction']:g}" for r in backdoors]
    ys = range(len(backdoors))
    bars.barh([y - 0.2 for y in ys], [r["metrics"]["attack_success_rate"] for r in backdoors], 0.4,
              label="attack success")
    bars.barh([y + 0.2 for y in ys], [r["metrics"]["main_accuracy"] for r in backdoors], 0.4, label="main accuracy")
    if backdoors:
        bars.axvline(backdoors[0]["baseline"]["attack_success_rate"], color="grey", ls="--",
                     label="clean model's rate for the trigger")
    bars.set_yticks(list(ys), labels, fontsize=7)
    bars.invert_yaxis()
    bars.set_xlim(0, 1.05)
    bars.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=3)
    bars.set_title("backdoor vs defence (digits, 10 clients)\nprotocol · behaviour · defence · malicious fraction",
                   fontsize=9)
    if panels == 3:
        by_fraction = axes[1]
        for key in sorted({(r["protocol"], r["metrics"]["defence"]) for r in replacement}):
            points = sorted((r["metrics"]["malicious_fraction"], r["metrics"]["attack_success_rate"],
                             r["metrics"]["main_accuracy"]) for r in replacement
                            if (r["protocol"], r["metrics"]["defence"]) == key)
            if len(points) > 1:
                line, = by_fraction.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                                         label=f"{key[0]} {key[1]}: ASR")
                by_fraction.plot([p[0] for p in points], [p[2] for p in points], ls=":", marker=".",
                                 color=line.get_color(), label=f"{key[0]} {key[1]}: main accuracy")
        by_fraction.set_xlabel("malicious fraction")
        by_fraction.set_xticks(fractions)
        by_fraction.set_ylim(-0.02, 1.05)
        by_fraction.set_title("model replacement vs the malicious fraction", fontsize=9)
        by_fraction.legend(fontsize=6)
    for r in backdoors:
        if r["metrics"]["behaviour"] == "adaptive":
            by_round.plot(range(1, len(r["metrics"]["asr_by_round"]) + 1), r["metrics"]["asr_by_round"], marker="o",
                          label=f"adaptive, {r['protocol']} {r['metrics']['defence']}")
    by_round.set_xlabel("round")
    by_round.set_ylabel("attack success rate")
    by_round.set_ylim(0, 1.05)
    by_round.set_title("adaptive backdoor (0.99 × the bound, every round)", fontsize=9)
    if by_round.lines:
        by_round.legend(fontsize=7)
    save_figure(fig, path, dpi=110)


@experiment("backdoor", minutes=(11.0, 40.0), attacks=("backdoor", "model_poisoning"),
            summary="malicious clients (backdoors, model poisoning, wrap-around) vs FedAvg and secure aggregation, "
                    "with a norm bound (reject or clip) or FLTrust, in the clear or inside MPC")
def sweep(out_dir: Path, *, quick: bool, seed: int, progress, runs=None) -> list[dict]:
    from securecollab.runs import run_protocol

    discover()
    progress(f"clean FedAvg, {N_CLIENTS} clients, {ROUNDS} rounds (the baseline)")
    clean = out_dir / "fedavg_clean"
    run_protocol("fedavg", FedAvgPlan(num_clients=N_CLIENTS, rounds=ROUNDS, seed=seed), clean)
    rows = []
    for protocol, behaviour, defence, k in cases(quick):
        progress(f"{protocol}, {k} malicious ({behaviour}), defence {defence_label(defence)}")
        run_dir, m = run_case(out_dir, protocol, behaviour, defence, k, seed)
        kind = BEHAVIOURS[behaviour].kind if m else "backdoor"  # no malicious client: the backdoor control
        evaluate = backdoor if kind == "backdoor" else model_poisoning
        rows += evaluate(run_dir, protocol=protocol, malice=m, target=TARGET, defence=defence_label(defence),
                         malicious_fraction=k / N_CLIENTS, baseline_run=clean)
    for r in rows:
        r["figure"] = "backdoor_vs_defence.png"
    plot(rows, out_dir / "backdoor_vs_defence.png")
    (out_dir / "rows.json").write_text(json.dumps(rows, indent=1))
    return rows
