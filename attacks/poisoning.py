"""What a malicious client achieved: backdoor success and the damage to the main task, per round.

The malicious client reads it off what it received: the global model of every round, recorded in its own
transcript (the final one too). Attack success rate (ASR): of the test images whose true class is not the
target, the fraction classified as the target once the trigger is stamped on them. Its baseline is the clean
model's rate for the same trigger (the same federation without the malicious client, ``baseline_run``; else
the global model of the round before the client started acting); the main accuracy's is the clean run's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attacks.metrics import rate_ci
from attacks.registry import attack, row
from securecollab.models import load_arrays
from securecollab.plans import FedAvgPlan
from securecollab.poisoning import Malice, add_trigger
from securecollab.training import predict_logits
from securecollab.transcript import Kind, load_transcript


def global_models(run_dir: Path, client: str) -> list[list[tuple[str, np.ndarray]]]:
    """The global model of each round as `client` received it, the final one last."""
    records = load_transcript(Path(run_dir) / "transcripts" / f"{client}.jsonl").of_kind(Kind.GLOBAL_MODEL)
    if not records:
        raise ValueError(f"{run_dir}: {client}'s transcript holds no global model")
    return [list(r.tensors.items()) for r in records]


def _rate(hits: np.ndarray) -> tuple[float, list[float]]:
    return float(hits.mean()), list(rate_ci(int(hits.sum()), hits.size))


def scores(model, params, x_test, y_test, target: int) -> dict:
    """Main accuracy on the clean test set and ASR on the triggered images of the other classes."""
    load_arrays(model, params)
    main = predict_logits(model, x_test).argmax(1) == y_test
    others = y_test != target
    triggered = predict_logits(model, add_trigger(x_test[others])).argmax(1) == target
    (acc, acc_ci), (asr, asr_ci) = _rate(main), _rate(triggered)
    return {"main_accuracy": acc, "main_accuracy_ci": acc_ci, "attack_success_rate": asr,
            "attack_success_rate_ci": asr_ci}


def _evaluate(run_dir: Path, client: str, target: int):
    plan = FedAvgPlan.from_json((Path(run_dir) / "plan.json").read_text())
    ds = plan.load_data()
    model = plan.build_model(ds)
    return plan, [scores(model, p, ds.x_test, ds.y_test, target) for p in global_models(run_dir, client)]


def _rows(kind: str, run_dir: Path, *, protocol: str, client: str, malice: Malice | None, target: int, defence: str,
          malicious_fraction: float, baseline_run: Path | None) -> list[dict]:
    target = malice.target if malice else target
    plan, by_round = _evaluate(run_dir, client, target)
    if baseline_run is not None:
        base = _evaluate(baseline_run, client, target)[1][-1]
    else:
        base = by_round[min(malice.from_round if malice else 0, len(by_round) - 1)]
    final = by_round[-1]
    asr = [round(s["attack_success_rate"], 4) for s in by_round[1:]]  # after each round's aggregation
    metrics = {"n_clients": plan.num_clients, "rounds": plan.rounds, "behaviour": malice.behaviour if malice else "none",
               "defence": defence, "malicious_fraction": malicious_fraction, **final}
    if kind == "backdoor":
        reached = [i + 1 for i, a in enumerate(asr) if a >= 0.5]
        metrics.update(asr_by_round=asr, rounds_to_half=reached[0] if reached else None,
                       target_class=target, poison_fraction=malice.poison_fraction if malice else 0.0)
    else:
        for k in ("attack_success_rate", "attack_success_rate_ci"):
            metrics.pop(k)
        metrics["accuracy_by_round"] = [round(s["main_accuracy"], 4) for s in by_round[1:]]
    baseline = {k: v for k, v in base.items() if kind == "backdoor" or not k.startswith("attack_success")}
    return [row(kind, protocol, "client", metrics, {"source": "clean run" if baseline_run else "before acting",
                                                    **baseline})]


_OPTIONS = ("client: the malicious client's id (default client-0); malice: its Malice (none: the control, scored for "
            "`target`); defence, malicious_fraction: labels for the row; baseline_run: the same federation without "
            "malicious clients")


@attack("backdoor", adversary="client", protocols=("fedavg", "secagg"),
        summary="attack success rate of a backdoor (trigger -> target class) and the main accuracy, per round; " + _OPTIONS)
def backdoor(run_dir: Path, *, protocol: str = "fedavg", client: str = "client-0", malice: Malice | None = None,
             target: int = 0, defence: str = "none", malicious_fraction: float = 0.0, baseline_run: Path | None = None, **_) -> list[dict]:
    return _rows("backdoor", run_dir, protocol=protocol, client=client, malice=malice, target=target, defence=defence,
                 malicious_fraction=malicious_fraction, baseline_run=baseline_run)


@attack("model_poisoning", adversary="client", protocols=("fedavg", "secagg"),
        summary="main accuracy after untargeted poisoning (sign flip, scale, random, wrap-around), per round; " + _OPTIONS)
def model_poisoning(run_dir: Path, *, protocol: str = "fedavg", client: str = "client-0", malice: Malice | None = None,
                    target: int = 0, defence: str = "none", malicious_fraction: float = 0.0, baseline_run: Path | None = None,
                    **_) -> list[dict]:
    return _rows("model_poisoning", run_dir, protocol=protocol, client=client, malice=malice, target=target, defence=defence,
                 malicious_fraction=malicious_fraction, baseline_run=baseline_run)
