"""Experiment ``backdoor``: malicious clients against plain FedAvg and secure aggregation, with and without
a norm bound (in the clear at the FedAvg aggregator: update analysis; inside MPC under secure aggregation).

Real runs: 10 client processes on digits (the default MLP, 10 rounds), the first `k` of them malicious
(securecollab.poisoning). A model-replacement backdoor acts in the last round (Bagdasaryan et al. 2020:
its update boosted by n / k); the adaptive backdoor acts every round, scaled to just inside the bound it
knows; the wrap-around update is the one crafted against a bare in-MPC norm check. Each row is read off the
malicious client's own transcript (attacks/poisoning.py) beside the clean run (no malicious client).

The bound, 4.0, is above every honest delta's norm in these runs (1.0 to 3.2 over the rounds) and far
below a boosted one's (~30).
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


def cases(quick: bool) -> list[tuple[str, str, float, int]]:
    """(protocol, behaviour, norm bound, malicious clients): each one real run."""
    quick_cases = [("fedavg", "model_replacement", 0.0, 1), ("fedavg", "model_replacement", BOUND, 1),
                   ("secagg", "none", BOUND, 0), ("secagg", "model_replacement", BOUND, 1),
                   ("secagg", "adaptive", BOUND, 1), ("fedavg", "wraparound", 0.0, 1)]
    if quick:
        return quick_cases
    more = [("secagg", "wraparound", BOUND, 1), ("secagg", "model_replacement", 0.0, 1)]
    more += [(p, b, bound, 1) for b in ("sign_flip", "scale", "random") for p, bound in
             (("fedavg", 0.0), ("secagg", BOUND))]
    more += [(p, "model_replacement", bound, k) for k in (2, 3) for p, bound in (("fedavg", 0.0), ("secagg", BOUND))]
    return quick_cases + more


def run_case(out_dir: Path, protocol: str, behaviour: str, bound: float, k: int, seed: int) -> tuple[Path, Malice | None]:
    from securecollab.runs import run_protocol

    m = malice(behaviour, k) if k else None
    plan = FedAvgPlan(num_clients=N_CLIENTS, rounds=ROUNDS, seed=seed,
                      norm_bound=bound if protocol == "fedavg" else 0.0)
    run_dir = out_dir / f"{protocol}_{behaviour}_k{k}_bound{bound:g}"
    options = {"malicious": {f"client-{i}": m for i in range(k)}} if k else {}
    if protocol == "secagg":
        options["secagg"] = SecAggPlan(training=plan, norm_bound=bound)
    run_protocol(protocol, plan, run_dir, **options)
    return run_dir, m


def plot(rows: list[dict], path: Path) -> None:
    backdoors = [r for r in rows if r["attack"] == "backdoor"]
    fig, (bars, by_round) = pyplot().subplots(1, 2, figsize=(10, 3.8))
    labels = [f"{r['protocol']}\n{r['metrics']['behaviour']}\n{r['metrics']['defence']}\n"
              f"{r['metrics']['malicious_fraction']:g} malicious" for r in backdoors]
    xs = range(len(backdoors))
    bars.bar([x - 0.2 for x in xs], [r["metrics"]["attack_success_rate"] for r in backdoors], 0.4, label="attack success")
    bars.bar([x + 0.2 for x in xs], [r["metrics"]["main_accuracy"] for r in backdoors], 0.4, label="main accuracy")
    if backdoors:
        bars.axhline(backdoors[0]["baseline"]["attack_success_rate"], color="grey", ls="--",
                     label="clean model's rate for the trigger")
    bars.set_xticks(list(xs), labels, fontsize=6)
    bars.set_ylim(0, 1.3)
    bars.legend(fontsize=7, loc="upper center", ncol=3)
    bars.set_title("backdoor vs defence (digits, 10 clients)", fontsize=9)
    for r in backdoors:
        if r["metrics"]["behaviour"] == "adaptive":
            by_round.plot(range(1, len(r["metrics"]["asr_by_round"]) + 1), r["metrics"]["asr_by_round"], marker="o",
                          label=f"adaptive, {r['protocol']} {r['metrics']['defence']}")
    by_round.set_xlabel("round")
    by_round.set_ylabel("attack success rate")
    by_round.set_ylim(0, 1.05)
    by_round.set_title("adaptive backdoor: scaled to just inside the bound, every round", fontsize=9)
    if by_round.lines:
        by_round.legend(fontsize=7)
    save_figure(fig, path, dpi=110)


@experiment("backdoor", minutes=(9.0, 25.0), attacks=("backdoor", "model_poisoning"),
            summary="malicious clients (backdoors, model poisoning, wrap-around) vs FedAvg and secure aggregation, "
                    "with a norm bound in the clear or inside MPC")
def sweep(out_dir: Path, *, quick: bool, seed: int, progress, runs=None) -> list[dict]:
    from securecollab.runs import run_protocol

    discover()
    progress(f"clean FedAvg, {N_CLIENTS} clients, {ROUNDS} rounds (the baseline)")
    clean = out_dir / "fedavg_clean"
    run_protocol("fedavg", FedAvgPlan(num_clients=N_CLIENTS, rounds=ROUNDS, seed=seed), clean)
    rows = []
    for protocol, behaviour, bound, k in cases(quick):
        progress(f"{protocol}, {k} malicious ({behaviour}), norm bound {bound:g}")
        run_dir, m = run_case(out_dir, protocol, behaviour, bound, k, seed)
        kind = BEHAVIOURS[behaviour].kind if m else "backdoor"  # no malicious client: the backdoor control
        evaluate = backdoor if kind == "backdoor" else model_poisoning
        defence = f"norm_bound({bound:g})" if bound else "none"
        rows += evaluate(run_dir, protocol=protocol, malice=m, target=TARGET, defence=defence,
                         malicious_fraction=k / N_CLIENTS, baseline_run=clean)
    for r in rows:
        r["figure"] = "backdoor_vs_defence.png"
    plot(rows, out_dir / "backdoor_vs_defence.png")
    (out_dir / "rows.json").write_text(json.dumps(rows, indent=1))
    return rows
