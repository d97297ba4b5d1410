"""Gradient inversion on real federated-learning transcripts: plain FedAvg's updates and secure aggregation's aggregates.

Adversaries and what they hold (nothing else is read):

* plain FedAvg, the **aggregator**: its transcript (``transcripts/aggregator.jsonl``),
  i.e. the plan it wrote and every client's new weights; the global weights it
  sent are replayed from those.
* secure aggregation, the **coordinator**: its transcript
  (``transcripts/coordinator.jsonl``), i.e. the plan, and per round the revealed
  sum of the included clients' updates and who was included; the global model
  is replayed from the initial one (seeded by the plan) and the aggregates.

Both know the architecture and how clients train (the plan they sent), not the
data. Ground-truth images are looked up only to score the reconstructions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from attacks.analytic_fc import analytic_fc_attack, fc_input_candidates, input_layer_delta
from attacks.gradient_inversion import (
    InversionConfig,
    cosine_distance,
    gradient_objective,
    invert_update,
    labels_for,
    leaf_params,
    optimize_dummies,
    simulate_update,
)
from attacks.knowledge import LocalTraining
from attacks.metrics import pool_scores, rate_ci, score_inversion, score_with_baselines
from attacks.observed import as_dict, client_updates, global_params_at, gradient_from_update, parameter_delta
from attacks.registry import attack, row
from attacks.separation import separated_or
from attacks.span_prior import span_prior_inversions
from securecollab.data import Dataset
from securecollab.models import parameters_to_arrays
from securecollab.plans import FedAvgPlan, SecAggPlan
from securecollab.training import step_batches
from securecollab.transcript import Kind, Transcript, load_transcript
from securecollab.updates import apply_aggregate

AGGREGATOR, COORDINATOR = "aggregator", "coordinator"


def client_index(client_id: str) -> int:
    return int(client_id.rsplit("-", 1)[1])


def local_training(plan: FedAvgPlan, index: int, round_: int) -> LocalTraining:
    """How client ``index`` trained in ``round_``, as the plan's author knows it (seeds included)."""
    seed = plan.seed * 1000 + index
    if plan.local_steps:
        # the round's steps are given below as explicit batches; here: one pass over them in order
        return LocalTraining(lr=plan.lr, momentum=plan.momentum, epochs=1, batch_size=plan.batch_size)
    return LocalTraining(lr=plan.lr, momentum=plan.momentum, epochs=plan.local_epochs,
                         batch_size=plan.batch_size, shuffle_seed=seed, epoch_offset=round_ * plan.local_epochs)


def images_used(plan: FedAvgPlan, index: int, round_: int) -> np.ndarray:
    """Training-split indices of the examples client ``index`` trained on in ``round_`` (scoring only)."""
    shard = plan.shard_indices(index)
    if plan.local_steps:
        steps = step_batches(len(shard), plan.batch_size, plan.seed * 1000 + index,
                             round_ * plan.local_steps, plan.local_steps)
        return shard[np.unique(np.concatenate(steps))]
    return shard


def is_fedsgd(plan: FedAvgPlan) -> bool:
    """Each client one gradient of one image per round."""
    return plan.local_steps == 1 and plan.batch_size == 1


def dummies_per_client(plan: FedAvgPlan) -> int:
    """How many images the adversary reconstructs per client and round (the examples it trained on)."""
    if plan.local_steps:
        return min(plan.local_steps * plan.batch_size, plan.samples_per_client or plan.local_steps * plan.batch_size)
    if not plan.samples_per_client:
        raise ValueError("clients train on their whole shard: give the plan samples_per_client to bound the attack")
    return plan.samples_per_client


def _plan_from(transcript, cls):
    records = transcript.of_kind(Kind.PLAN)
    if not records:
        raise ValueError("the transcript holds no plan record (recorded by services since this version)")
    return cls.from_json(json.dumps(records[0].meta["plan"]))


@dataclass
class AdversaryView:
    """What the FedAvg aggregator or the secagg coordinator holds before attacking: its transcript and
    the training plan it recorded, whence the data set's public shape (and the attacker's auxiliary
    data, the test split), the architecture and the seeded initial global weights."""

    transcript: Transcript
    plan: FedAvgPlan
    ds: Dataset
    model: nn.Module                       # the architecture; its own weights are not used
    initial: list[tuple[str, np.ndarray]]  # the global model of round 0
    secagg: SecAggPlan | None = None       # the coordinator's: how rounds were secured


def load_view(run_dir: Path, party: str) -> AdversaryView:
    """The view of ``party`` (:data:`AGGREGATOR` or :data:`COORDINATOR`) from its transcript in ``run_dir``."""
    transcript = load_transcript(Path(run_dir) / "transcripts" / f"{party}.jsonl")
    secagg = _plan_from(transcript, SecAggPlan) if party == COORDINATOR else None
    plan = secagg.training if secagg else _plan_from(transcript, FedAvgPlan)
    ds = plan.load_data()
    return AdversaryView(transcript, plan, ds, plan.build_model(ds), parameters_to_arrays(plan.build_model(ds)),
                         secagg)


# What the optimizer assumes of an image beyond fitting the observation: total variation (smoothness).
PRIOR = "tv"


def local_steps_of(plan: FedAvgPlan, num_examples: int) -> int:
    """SGD steps one client took in a round on ``num_examples`` examples (DP-SGD's Poisson batches count as
    many steps as plain batches would)."""
    return plan.local_steps or local_training(plan, 0, 0).num_steps(num_examples)


def defence_of(view: AdversaryView) -> str:
    """The defences the observed updates went through, as the plan that the adversary holds declares them."""
    plan, secagg, parts = view.plan, view.secagg, []
    if plan.dp:
        parts.append(f"dp_sgd(noise={plan.dp_noise_multiplier:g},clip={plan.dp_max_grad_norm:g})")
    if secagg and secagg.norm_bound:
        parts.append(f"norm_bound({secagg.norm_bound:g})")
    if secagg and secagg.dp_sigma:
        parts.append(f"mpc_dp_noise({secagg.dp_sigma:g})")
    return "+".join(parts) or "none"


def observation_fields(observed: list[tuple[int, int]]) -> dict:
    """``samples_per_update`` and ``local_steps`` of a row's observations, which must all agree: a row
    describes one kind of observation."""
    if len(set(observed)) != 1:
        raise ValueError(f"a row's observations differ in (samples, local steps): {sorted(set(observed))}")
    samples, steps = observed[0]
    return {"samples_per_update": int(samples), "local_steps": int(steps)}


def observed_updates(view: AdversaryView):
    """(round, sender, global weights it was sent, its new weights) of every update the aggregator received."""
    for round_ in sorted({r.round for r in view.transcript.of_kind(Kind.UPDATE)}):
        global_params = global_params_at(view.initial, view.transcript, round_)
        for sender, (_, new) in sorted(client_updates(view.transcript, round_).items()):
            yield round_, sender, global_params, new


def _config(quick: bool, iterations: int | None) -> InversionConfig:
    return InversionConfig(iterations=iterations or (150 if quick else 300), restarts=1)


# -- plain FedAvg: the aggregator's view -------------------------------------------------------------

@attack("gradient_inversion", adversary="aggregator | coordinator", protocols=("fedavg", "secagg"),
        summary="optimization-based inversion (cosine + TV, iDLG labels) of client updates or the revealed aggregate")
def gradient_inversion(run_dir: Path, *, quick: bool = False, iterations: int | None = None,
                       max_observations: int | None = None, **_) -> list[dict]:
    run_dir = Path(run_dir)
    if (run_dir / "transcripts" / f"{COORDINATOR}.jsonl").exists():
        return invert_secagg_run(run_dir, quick=quick, iterations=iterations, max_observations=max_observations)
    return invert_fedavg_run(run_dir, quick=quick, iterations=iterations, max_observations=max_observations)


def invert_fedavg_run(run_dir: Path, *, quick: bool = False, iterations: int | None = None,
                      max_observations: int | None = None) -> list[dict]:
    """Invert each client's update alone (N = 1): what plain FedAvg shows its aggregator."""
    view = load_view(run_dir, AGGREGATOR)
    plan, ds, model = view.plan, view.ds, view.model
    config = _config(quick, iterations)
    scores, observed = [], []
    by_prior: dict[str, list[dict]] = {}
    for round_, sender, global_params, new in observed_updates(view):
        if max_observations is not None and len(scores) >= max_observations:
            continue  # past the budget: the remaining updates are skipped
        index = client_index(sender)
        truth = images_used(plan, index, round_)
        inv = invert_update(model, list(global_params.items()), list(new.items()), len(truth), ds.input_shape,
                            ds.num_classes, local_training(plan, index, round_), auxiliary_images=ds.x_test,
                            config=config)
        scores.append(score_inversion(inv.images, inv.labels, truth, ds))
        observed.append((len(truth), local_steps_of(plan, len(truth))))
        for prior, guess in _span_priors(model, global_params, new, len(truth), ds, plan).items():
            by_prior.setdefault(prior, []).append(score_inversion(guess.images, guess.labels, truth, ds))
    common = dict(n_clients=1, observations=len(scores), **observation_fields(observed), defence=defence_of(view))
    return [_row("fedavg", AGGREGATOR, scores, plan, iterations=config.iterations, prior=PRIOR, **common)] + \
        [_row("fedavg", AGGREGATOR, found, plan, prior=prior, **common)
         for prior, found in by_prior.items() if len(found) == len(scores)]


def _span_priors(model, global_params: dict, new_params: dict, k: int, ds, plan: FedAvgPlan) -> dict:
    """Prior -> the input-plane reconstruction (attacks/span_prior.py) of one update, where the model and k
    give the update an input plane; none for one image (FedSGD, one-image DP-SGD), where the plane is one
    point: the image, which analytic_fc reads off directly."""
    if is_fedsgd(plan) or k == 1:
        return {}
    return span_prior_inversions(model, global_params, new_params, k, ds)


def _row(protocol: str, adversary: str, scores: list[dict], plan: FedAvgPlan, **params) -> dict:
    metrics = {**pool_scores(scores, "metrics"), **params}
    baseline = pool_scores(scores, "baseline")
    return row("gradient_inversion", protocol, adversary, metrics, baseline,
               random=pool_scores(scores, "random"))


@attack("analytic_fc", adversary="aggregator", protocols=("fedavg",),
        summary="closed-form input of a first fully-connected layer from one client's one-image update")
def analytic_fc(run_dir: Path, **_) -> list[dict]:
    view = load_view(run_dir, AGGREGATOR)
    plan, ds, model = view.plan, view.ds, view.model
    recon, truth, observed = [], [], []
    for round_, sender, global_params, new in observed_updates(view):
        used = images_used(plan, client_index(sender), round_)
        if len(used) != 1:
            continue  # the closed form needs one image per update
        recon.append(analytic_fc_attack(model, list(global_params.items()), list(new.items()), ds.input_shape))
        truth.append(used[0])
        observed.append((1, local_steps_of(plan, 1)))
    if not recon:
        raise ValueError("no one-image update in this transcript: the analytic attack needs batch-1 updates")
    truth = np.array(truth)
    s = score_with_baselines(np.stack(recon), ds.x_train[truth], ds.x_test, pool=ds.x_train,
                             source_indices=truth, match=False)
    err = float(np.max(np.abs(np.stack(recon) - ds.x_train[truth])))
    return [row("analytic_fc", "fedavg", "aggregator",
                {**_metrics_of(s["metrics"], len(truth)), "max_abs_error": err, "images": len(truth),
                 "observations": len(truth), "n_clients": 1, **observation_fields(observed),
                 "defence": defence_of(view)},
                _metrics_of(s["baseline"], len(truth)))]


def _metrics_of(score: dict, n: int) -> dict:
    """The numbers of a score, with the 95% interval of its re-identification rate over ``n`` images."""
    out = {k: v for k, v in score.items() if isinstance(v, (int, float))}
    if "reid_rate" in out:
        out["reid_rate_ci"] = list(rate_ci(round(out["reid_rate"] * n), n))
    return out


# -- secure aggregation: the coordinator's view --------------------------------------------------------

def aggregate_objective(model, params: dict, observed: dict[str, np.ndarray], trainings: list[LocalTraining],
                        per_client: int, layerwise: float = 1.0):
    """Cosine distance between the sum of every included client's simulated update and the revealed sum."""
    names = list(params)
    target = [torch.as_tensor(observed[n], dtype=torch.float32) for n in names]

    def objective(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = None
        for k, training in enumerate(trainings):
            part = slice(k * per_client, (k + 1) * per_client)
            delta = simulate_update(model, params, images[part], targets[part], training)
            total = delta if total is None else {n: total[n] + delta[n] for n in names}
        return cosine_distance([total[n] for n in names], target, layerwise=layerwise)

    return objective


def first_layer_candidates(model, global_params: dict, new_params: dict, count: int, input_shape) -> np.ndarray | None:
    """Starting images read off the first layer's rows (see fc_input_candidates); None for a conv-first model."""
    first = input_layer_delta(model, global_params, new_params)
    if first is None:
        return None
    found = fc_input_candidates(*first, count)
    return found.reshape(len(found), *input_shape)


def invert_aggregate(model, global_params: dict, aggregate: np.ndarray, included: list[str], plan: FedAvgPlan,
                     round_: int, ds, config: InversionConfig, *, separation: bool = True):
    """Reconstruct all N x k images behind one revealed aggregate. In the FedSGD regime the aggregate is
    also separated layer by layer (attacks/separation.py, where the model allows it), and whichever guess
    explains the observed step better is kept (``separation=False``: the optimization alone)."""
    per_client = dummies_per_client(plan)
    count = len(included)
    step = dict(apply_aggregate(list(global_params.items()), aggregate))  # global + mean update
    trainings = [local_training(plan, client_index(c), round_) for c in included]
    if is_fedsgd(plan):
        # FedSGD: the sum of N one-image gradient steps is one step on the N images: one gradient
        training = LocalTraining(lr=plan.lr, epochs=1)
        optimized = invert_update(model, list(global_params.items()), list(step.items()), count, ds.input_shape,
                                  ds.num_classes, training, auxiliary_images=ds.x_test, config=config,
                                  init=first_layer_candidates(model, global_params, step, count, ds.input_shape))
        if not separation:
            return optimized
        return separated_or(optimized, model, global_params, step, count, plan.lr / count, ds)
    params = leaf_params(model, list(global_params.items()))
    observed = {n: d * count for n, d in parameter_delta(list(global_params.items()), list(step.items())).items()}
    implied = gradient_from_update(list(global_params.items()), list(step.items()), trainings[0], per_client * count)
    labels = labels_for(model, list(global_params.items()), implied, per_client * count, None, ds.x_test, config)
    if labels is not None:
        labels = np.random.default_rng(round_).permutation(labels)  # spread the multiset over the clients
    objective = aggregate_objective(model, params, observed, trainings, per_client, config.layerwise)
    if config.regime == "gradient":
        objective = gradient_objective(model, params, implied, layerwise=config.layerwise)
    return optimize_dummies(objective, per_client * count, ds.input_shape, ds.num_classes, labels, config)


def invert_secagg_run(run_dir: Path, *, quick: bool = False, iterations: int | None = None,
                      max_observations: int | None = None) -> list[dict]:
    """Rows per number of included clients N: the revealed aggregates of N clients, inverted. In the FedSGD
    regime two rows per N, for the ablation: the optimization alone (``separation: none``), and the better
    of it and the layer-by-layer separation (``separation: hidden_span``, ``separated``: how many of the
    aggregates the separation explained better). In the FedAvg regime, a row per prior of
    attacks/span_prior.py where the N x k images leave the first layer an input plane."""
    view = load_view(run_dir, COORDINATOR)
    plan, ds, model, params = view.plan, view.ds, view.model, view.initial
    config = _config(quick, iterations)
    fedsgd = is_fedsgd(plan)
    by_n: dict[tuple[int, str], list[dict]] = {}
    observed: dict[int, list[tuple[int, int]]] = {}
    separated: dict[int, int] = {}
    by_prior: dict[tuple[int, str], list[dict]] = {}
    seen: set[int] = set()
    observations = 0
    for rec in view.transcript.of_kind(Kind.AGGREGATE):
        if rec.round in seen:
            continue  # revealed again after a coordinator restart: same aggregate
        seen.add(rec.round)
        included = list(rec.meta["included"])
        aggregate = rec.tensors["aggregate"]
        if max_observations is None or observations < max_observations:
            n = len(included)
            used = [images_used(plan, client_index(c), rec.round) for c in included]
            truth = np.concatenate(used)
            inv = invert_aggregate(model, as_dict(params), aggregate, included, plan, rec.round, ds, config,
                                   separation=False)
            by_n.setdefault((n, "none"), []).append(score_inversion(inv.images, inv.labels, truth, ds))
            mean_step = dict(apply_aggregate(params, aggregate))
            for prior, guess in _span_priors(model, as_dict(params), mean_step, len(truth), ds, plan).items():
                by_prior.setdefault((n, prior), []).append(score_inversion(guess.images, guess.labels, truth, ds))
            if fedsgd:
                best = separated_or(inv, model, as_dict(params), mean_step, n, plan.lr / n, ds)
                by_n.setdefault((n, "hidden_span"), []).append(score_inversion(best.images, best.labels, truth, ds))
                separated[n] = separated.get(n, 0) + (best.method == "hidden_span")
            steps = {local_steps_of(plan, len(u)) for u in used}
            if len(steps) != 1:
                raise ValueError(f"round {rec.round}: included clients took different numbers of steps {steps}")
            observed.setdefault(n, []).append((len(truth), steps.pop()))
            observations += 1
        params = apply_aggregate(params, aggregate)
    rows = [_row("secagg", COORDINATOR, scores, plan, n_clients=n, observations=len(scores),
                 iterations=config.iterations, **observation_fields(observed[n]), defence=defence_of(view),
                 prior=PRIOR, separation=how, **({"separated": separated[n]} if how != "none" else {}))
            for (n, how), scores in sorted(by_n.items())]
    return rows + [_row("secagg", COORDINATOR, found, plan, n_clients=n, observations=len(found),
                        **observation_fields(observed[n]), defence=defence_of(view), prior=prior)
                   for (n, prior), found in sorted(by_prior.items()) if len(found) == len(observed[n])]
