"""The front door: run protocols, run attack experiments, build the scorecard; `demo` does all three.

The CLI's `securecollab demo` and `securecollab attack sweep` call this module, and so can a test or a
notebook::

    from securecollab import pipeline
    got = pipeline.demo(Path("results"), quick=True, attacks="gradient_inversion")
    got.card["protocols"]["secagg"]["accuracy"], got.paths

Progress goes to a callback, ``progress(Event)``: an event says that a step started, reported progress,
finished or failed (the CLI shows them as a spinner and one line a step). Nothing here prints.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from securecollab.plans import FedAvgPlan

# The scorecard reads from training-time leakage to inference-time leakage.
DEMO_ORDER = ("gradient_inversion", "split_attacks", "membership", "extraction", "dp", "backdoor")
# The demo's protocol runs, baselines first (the scorecard measures each protocol against its baseline).
DEMO_PROTOCOLS = ("centralized", "fedavg", "secagg", "split", "he_inference", "mpc_inference")


@dataclass(frozen=True)
class Event:
    """One thing a step did. ``kind``: start, update, done or failed.

    ``step`` is the protocol's or experiment's name, ``label`` what a person reads for it. ``text`` is, on
    start, a note (e.g. ``(~2 min)``); on update, the step's own progress; on done, its outcome; on failed,
    the error. ``result``: on a protocol's done, its result."""
    kind: str
    step: str
    label: str
    text: str = ""
    result: dict | None = None


Progress = Callable[[Event], None]


def _quiet(_event: Event) -> None:
    pass


def discover() -> None:
    """Register every attack and every experiment (each registry imports its own package)."""
    from attacks.registry import discover as discover_attacks
    from experiments.registry import discover as discover_experiments
    discover_attacks()
    discover_experiments()


def experiment_order() -> list[str]:
    """Every registered experiment: the demo's order first, then any other by name."""
    from experiments.registry import EXPERIMENTS
    from experiments.registry import discover as discover_experiments
    discover_experiments()
    return [n for n in DEMO_ORDER if n in EXPERIMENTS] + sorted(set(EXPERIMENTS) - set(DEMO_ORDER))


def chosen_experiments(spec: str | Iterable[str]) -> list[str]:
    """`all`, `none` or names separated by commas (or a list of names), in the demo's order.

    Raises ValueError naming any unknown experiment, so that a typo fails before any protocol runs."""
    order = experiment_order()
    if isinstance(spec, str):
        if spec.strip() == "all":
            return order
        if spec.strip() == "none":
            return []
        spec = spec.split(",")
    names = [n.strip() for n in spec if n.strip()]
    unknown = [n for n in names if n not in order]
    if unknown:
        raise ValueError(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(order)}, all or none")
    return [n for n in order if n in names]


def demo_plan(*, model: str = "mlp", clients: int = 4, seed: int = 0, quick: bool = False) -> FedAvgPlan:
    """The demo's training plan: embedded digits; quick: 5 rounds instead of 10."""
    return FedAvgPlan(model=model, num_clients=clients, seed=seed, **({"rounds": 5} if quick else {}))


def protocol_label(name: str, plan: FedAvgPlan) -> str:
    """What the demo says while protocol run ``name`` of ``plan`` runs."""
    clients = plan.num_clients
    return {
        "centralized": "centralized training (baseline)",
        "fedavg": f"plain FedAvg over gRPC: {clients} client processes, {plan.rounds} rounds",
        "secagg": f"FedAvg over secure aggregation: 3 CrypTen compute parties, {clients} clients",
        "split": f"split learning over gRPC: server + {clients} client processes in turns",
        "he_inference": "encrypted inference (CKKS): HE server process, the test set encrypted",
        "mpc_inference": "model-private inference (MPC): 3 CrypTen parties + dealer, weights and test set shared, "
                         "labels only",
    }.get(name, name)


def run_protocols(names: Iterable[str], plan: FedAvgPlan, out: Path, *,
                  progress: Progress = _quiet) -> dict[str, dict]:
    """Run each protocol of ``plan`` (real processes over gRPC) into ``out/runs/NAME``; their results by name."""
    from securecollab.runs import run_protocol
    results = {}
    for name in names:
        label = protocol_label(name, plan)
        progress(Event("start", name, label))
        results[name] = run_protocol(name, plan, Path(out) / "runs" / name)
        progress(Event("done", name, label, f"accuracy {results[name]['accuracy']:.3f}, "
                                            f"{results[name]['costs']['wall_s']:.1f}s", result=results[name]))
    return results


def _experiment(name: str, target: Path, label: str, note: str, *, quick: bool, seed: int,
                runs: dict[str, Path] | None, progress: Progress) -> list[dict]:
    from experiments.registry import run_experiment
    progress(Event("start", name, label, note))
    return run_experiment(name, target, quick=quick, seed=seed, runs=runs,
                          progress=lambda msg: progress(Event("update", name, label, msg)))


def run_experiments(names: Iterable[str], out: Path, *, quick: bool = True, seed: int = 0,
                    runs: dict[str, Path] | None = None,
                    progress: Progress = _quiet) -> tuple[list[dict], list[dict]]:
    """Run each experiment into ``out/attacks/NAME``, using the protocol runs in ``runs`` where they fit.

    Returns (scorecard rows, failures): a failed experiment does not lose the others' rows; each failure is
    ``{"experiment", "error", "traceback"}``. Figures' paths in the rows are relative to ``out``."""
    from experiments.registry import EXPERIMENTS
    out = Path(out)
    rows, failed = [], []
    for name in names:
        target = out / "attacks" / name
        label = f"attack experiment {name}"
        minutes = EXPERIMENTS[name].minutes[0 if quick else 1]
        try:
            got = _experiment(name, target, label, f"(~{minutes:g} min)", quick=quick, seed=seed, runs=runs,
                              progress=progress)
        except Exception as e:  # one failed experiment must not lose the others' results
            progress(Event("failed", name, label, str(e)))
            failed.append({"experiment": name, "error": f"{type(e).__name__}: {e}",
                           "traceback": traceback.format_exc(limit=5)})
            continue
        for r in got:
            r.setdefault("experiment", name)  # which sweep measured it: two sweeps may share a setting
            if r.get("figure"):
                r["figure"] = str((target / r["figure"]).relative_to(out))
        rows += got
        progress(Event("done", name, label, f"{len(got)} rows"))
    return rows, failed


def sweep(name: str, out: Path, *, quick: bool = True, seed: int = 0, progress: Progress = _quiet) -> tuple[list[dict], Path]:
    """One experiment alone, into ``out/NAME`` (its own runs); writes and returns its rows and rows.json's path."""
    known = experiment_order()
    if name not in known:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(sorted(known))}")
    target = Path(out) / name
    rows = _experiment(name, target, name, "", quick=quick, seed=seed, runs=None, progress=progress)
    (target / "rows.json").write_text(json.dumps(rows, indent=1))
    return rows, target / "rows.json"


def build_and_write_scorecard(results: dict[str, dict], plan: FedAvgPlan, out: Path, *,
                              attacks: list[dict] | None = None,
                              failed: list[dict] | None = None) -> tuple[dict, list[Path]]:
    """The scorecard of these protocol results and attack rows (failures as ``attack_errors``), written to ``out``
    with its figures and, last, report.html."""
    from securecollab.report import write_report
    from securecollab.scorecard import build_scorecard, write_scorecard
    card = build_scorecard(results, plan=json.loads(plan.to_json()), attacks=attacks)
    if failed:
        card["attack_errors"] = failed
    paths = write_scorecard(card, Path(out))
    return card, paths + [write_report(card, Path(out))]


@dataclass
class DemoResult:
    card: dict
    paths: list[Path]
    plan: FedAvgPlan
    results: dict[str, dict]
    attack_rows: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)  # experiments that raised (also the card's attack_errors)


def demo(out: Path = Path("results"), *, quick: bool = False, model: str = "mlp", clients: int = 4, seed: int = 0,
         attacks: str | Iterable[str] = "all", progress: Progress = _quiet) -> DemoResult:
    """Every protocol on the embedded digits, the chosen attack experiments on their runs, the scorecard.

    ``attacks``: `all`, `none`, names separated by commas, or a list; an unknown name raises ValueError
    before anything runs. An experiment that fails is reported in ``failed`` (and the card), not raised."""
    out = Path(out)
    chosen = chosen_experiments(attacks)
    plan = demo_plan(model=model, clients=clients, seed=seed, quick=quick)
    results = run_protocols(DEMO_PROTOCOLS, plan, out, progress=progress)
    rows, failed = run_experiments(chosen, out, quick=quick, seed=seed, progress=progress,
                                   runs={name: out / "runs" / name for name in results})
    card, paths = build_and_write_scorecard(results, plan, out, attacks=rows, failed=failed)
    return DemoResult(card, paths, plan, results, rows, failed)
