"""Plain FedAvg: the aggregator state machine and the client loop (the baseline for secure aggregation)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from securecollab.aggregation import AggregationRule
from securecollab.aggregation import rule as aggregation_rule
from securecollab.errors import ProtocolError, TooFewClients
from securecollab.models import load_arrays, parameters_to_arrays
from securecollab.plans import FedAvgPlan, root_data
from securecollab.poisoning import Behaviour
from securecollab.protocols.rounds import RoundState
from securecollab.training import TrainConfig, train_local
from securecollab.updates import apply_aggregate, ready_update, update_vector

log = logging.getLogger(__name__)


class FedAvgRounds(RoundState):
    """Aggregator side: collects one update per client per round and combines them with an aggregation rule
    (by default the mean, weighted by examples: FedAvg), in the clear."""

    def __init__(self, plan: FedAvgPlan, initial: list[tuple[str, np.ndarray]],
                 rule: AggregationRule | None = None):
        super().__init__(plan.rounds, plan.client_ids(), [(n, a.astype(np.float32)) for n, a in initial])
        self.plan = plan
        self.shapes = {n: a.shape for n, a in initial}
        self._pending: dict[str, tuple[int, list[tuple[str, np.ndarray]]]] = {}
        # Weighted by examples: the count entry of the result is the examples' total (FLTrust: the total trust).
        self.rule = rule or clear_rule(plan)
        self._root = None  # FLTrust: the aggregator's own data, loaded once
        self.empty_rounds: list[int] = []  # rounds in which the rule accepted no update
    def submit(self, client_id: str, round_: int, num_examples: int, params) -> int:
        """Accept one client's update; returns how many updates this round holds now."""
        self.check_client(client_id)
        with self._cond:
            if self.done:
                raise ProtocolError("FAILED_PRECONDITION", "training is finished")
            if round_ != self.round:
                raise ProtocolError("FAILED_PRECONDITION",
                                    f"update for round {round_}, current round is {self.round}")
            if client_id in self._pending:
                raise ProtocolError("ALREADY_EXISTS", f"{client_id} already submitted round {round_}")
            if num_examples <= 0:
                raise ProtocolError("INVALID_ARGUMENT", "num_examples must be positive")
            self._pending[client_id] = (num_examples, params)
            received = len(self._pending)
            if received == self.plan.num_clients:
                self._aggregate()
            return received

    def _aggregate(self) -> None:
        weights = np.array([n for n, _ in self._pending.values()], dtype=np.float64)
        sent = [dict(p) for _, p in self._pending.values()]
        updates = [update_vector([(name, s[name]) for name, _ in self.params], self.params) for s in sent]
        self._pending.clear()
        rule = self.rule
        if self.plan.robust:  # FLTrust: this round's direction is the aggregator's own update
            self._root = self._root or RootUpdates(self.plan)
            rule = aggregation_rule("fltrust", reference=self._root.delta(self.round, self.params))
        try:
            new = apply_aggregate(self.params, rule.clear(updates, weights), real_weights=rule.real_weights)
        except TooFewClients as e:
            # Every update was rejected (FLTrust: none trusted). The round still ends, with the model as it was,
            # so the clients waiting for it do not wait on; it counts as one of the plan's rounds (secure
            # aggregation instead aborts such a round and reopens from the same model under a new round id).
            log.warning("round %d: %s; the next round starts from this round's model", self.round, e)
            self.empty_rounds.append(self.round)
            new = self.params
        self._advance(new)


def clear_rule(plan: FedAvgPlan) -> AggregationRule:
    """What the plain aggregator applies by default: the mean, or the plan's norm bound (rejecting or clipping).
    A robust rule is built each round (securecollab.protocols.fedavg.RootUpdates)."""
    if plan.norm_bound:
        return aggregation_rule("norm_bound", bound=plan.norm_bound, mode=plan.norm_mode)
    return aggregation_rule("mean")


class RootUpdates:
    """FLTrust's server update: the aggregator trains the global model on its root data set with the clients'
    recipe, every round (the same for plain FedAvg and for the secure-aggregation coordinator)."""

    def __init__(self, plan: FedAvgPlan):
        self.plan = plan
        if not plan.vector_length:
            ds, self.x, self.y = root_data(plan)
            self.model = plan.build_model(ds)

    def delta(self, round_: int, global_params) -> np.ndarray:
        if self.plan.vector_length:  # a benchmark: the coordinator's update is ready-made, like the clients'
            return ready_update(self.plan.num_clients, self.plan.vector_length - 1, self.plan.seed).astype(np.float64)
        new = local_update(self.model, self.plan, round_, global_params, self.x, self.y,
                           client_index=self.plan.num_clients)  # a shuffling stream no client uses
        return update_vector(new, global_params)[:-1]


def local_update(model, plan: FedAvgPlan, round_: int, global_params, x, y, client_index: int):
    """One client's round: load the global model, train locally, return the new weights."""
    load_arrays(model, global_params)
    cfg = plan.train_config()
    # Each client shuffles with its own stream; rounds continue the epoch count.
    cfg = TrainConfig(**{**cfg.to_dict(), "seed": plan.seed * 1000 + client_index})
    if plan.dp:
        from securecollab.dp import train_local_dp
        # The noise must not be derivable from the plan (the aggregator wrote it): fresh OS entropy.
        train_local_dp(model, x, y, cfg, noise_multiplier=plan.dp_noise_multiplier,
                       max_grad_norm=plan.dp_max_grad_norm, epoch_offset=round_ * plan.local_epochs)
    elif plan.local_steps:
        train_local(model, x, y, cfg, steps=(round_ * plan.local_steps, plan.local_steps))
    else:
        train_local(model, x, y, cfg, epoch_offset=round_ * plan.local_epochs)
    return parameters_to_arrays(model)


def client_delta(model, plan: FedAvgPlan, round_: int, global_params, x, y, client_index: int,
                 malice: Behaviour | None = None, from_round: int = 0) -> np.ndarray:
    """The model delta a client sends this round (flat float64). A malicious client (from `from_round` on)
    trains on the data its behaviour chooses, then sends the delta its behaviour crafts."""
    acting = malice is not None and round_ >= from_round
    rng = np.random.default_rng([plan.seed, client_index, round_])  # the attacker's own randomness
    if acting:
        x, y = malice.data(x, y, rng)
        plan = dataclasses.replace(plan, **malice.training)
    new = local_update(model, plan, round_, global_params, x, y, client_index)
    delta = update_vector(new, global_params)[:-1]
    return malice.update(delta, rng) if acting else delta


def params_of(global_params, delta: np.ndarray):
    """The weights global + delta, as a FedAvg client submits them."""
    return apply_aggregate(global_params, np.append(delta, 1.0))
