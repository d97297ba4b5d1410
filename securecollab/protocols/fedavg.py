"""Plain FedAvg: the aggregator state machine and the client loop (the baseline for secure aggregation)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import torch

from securecollab.data import load_dataset, partition
from securecollab.models import build_model, load_arrays, parameters_to_arrays
from securecollab.protocols import ProtocolError
from securecollab.protocols.rounds import RoundState
from securecollab.training import TrainConfig, train_local


@dataclass(frozen=True)
class FedAvgPlan:
    """Everything a client needs to take part; sent to it in the Join reply."""

    model: str = "mlp"
    dataset: str = "digits"
    dataset_path: str | None = None
    activation: str = "relu"
    num_clients: int = 4
    # Tuned so FedAvg over 4 IID clients matches centralized training of the
    # same epochs on digits (both ~0.97).
    rounds: int = 10
    local_epochs: int = 3
    lr: float = 0.1
    momentum: float = 0.9
    batch_size: int = 32
    seed: int = 0
    partition: str = "iid"
    alpha: float = 0.5
    # Benchmarks only: the "model" is one vector of this many floats and
    # clients submit ready-made updates instead of training.
    vector_length: int = 0
    record_transcripts: bool = True
    # Attack experiments: each client keeps only this many examples of its shard (0: all of it) and,
    # with local_steps > 0, takes exactly that many mini-batch steps a round (FedSGD: batch 1, 1 step),
    # going on through its batch order from round to round.
    samples_per_client: int = 0
    local_steps: int = 0
    # DP-SGD local training (opacus) when dp_noise_multiplier > 0: per-example clipping to
    # dp_max_grad_norm, Gaussian noise, Poisson-sampled batches; epsilon at dp_delta per client.
    dp_noise_multiplier: float = 0.0
    dp_max_grad_norm: float = 1.0
    dp_delta: float = 1e-5

    def __post_init__(self):
        if self.samples_per_client < 0 or self.local_steps < 0:
            raise ValueError("samples_per_client and local_steps must be >= 0")
        if self.dp_noise_multiplier < 0 or self.dp_max_grad_norm <= 0 or not 0 < self.dp_delta < 1:
            raise ValueError("DP-SGD needs dp_noise_multiplier >= 0, dp_max_grad_norm > 0 and 0 < dp_delta < 1")
        if self.dp_noise_multiplier and self.local_steps:
            raise ValueError("DP-SGD samples its batches (Poisson): it trains whole local epochs, not local_steps")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "FedAvgPlan":
        return cls(**json.loads(text))

    @property
    def dp(self) -> bool:
        return self.dp_noise_multiplier > 0

    def dp_epsilon(self, num_examples: int, rounds: int | None = None) -> float | None:
        """A client's privacy loss after `rounds` rounds (default: all) of DP-SGD on `num_examples` examples."""
        if not self.dp:
            return None
        from securecollab.dp import epsilon, sample_rate, steps_per_epoch
        steps = (self.rounds if rounds is None else rounds) * self.local_epochs * steps_per_epoch(
            num_examples, self.batch_size)
        return epsilon(self.dp_noise_multiplier, sample_rate(num_examples, self.batch_size), steps, self.dp_delta)

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.local_epochs, lr=self.lr, batch_size=self.batch_size,
                           momentum=self.momentum, seed=self.seed)

    def client_ids(self) -> list[str]:
        return [f"client-{i}" for i in range(self.num_clients)]

    def build_model(self, dataset=None):
        if self.vector_length:
            return UpdateVector(self.vector_length)
        ds = dataset or load_dataset(self.dataset, seed=self.seed, path=self.dataset_path)
        return build_model(self.model, ds.input_shape, ds.num_classes,
                           activation=self.activation, seed=self.seed)


class UpdateVector(torch.nn.Module):
    """Stands in for a model in aggregation benchmarks: one flat vector of parameters."""

    def __init__(self, length: int):
        super().__init__()
        self.update = torch.nn.Parameter(torch.zeros(length))


class FedAvgRounds(RoundState):
    """Aggregator side: collects one update per client per round and averages them, weighted by examples."""

    def __init__(self, plan: FedAvgPlan, initial: list[tuple[str, np.ndarray]]):
        super().__init__(plan.rounds, plan.client_ids(), [(n, a.astype(np.float32)) for n, a in initial])
        self.plan = plan
        self.shapes = {n: a.shape for n, a in initial}
        self._pending: dict[str, tuple[int, list[tuple[str, np.ndarray]]]] = {}

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
        weights /= weights.sum()
        updates = [dict(p) for _, p in self._pending.values()]
        self._pending.clear()
        self._advance([
            (name, sum(w * u[name].astype(np.float64) for w, u in zip(weights, updates)).astype(np.float32))
            for name, _ in self.params
        ])


def client_shard(plan: FedAvgPlan, index: int, ds=None) -> np.ndarray:
    """Indices into the training split of the examples client `index` holds (a seeded partition)."""
    ds = ds or load_dataset(plan.dataset, seed=plan.seed, path=plan.dataset_path)
    parts = partition(ds.y_train, plan.num_clients, plan.partition, seed=plan.seed, alpha=plan.alpha)
    idx = np.sort(parts[index])
    return idx[:plan.samples_per_client] if plan.samples_per_client else idx


def client_data(plan: FedAvgPlan, index: int):
    """The data set and the training shard client `index` holds."""
    ds = load_dataset(plan.dataset, seed=plan.seed, path=plan.dataset_path)
    idx = client_shard(plan, index, ds)
    return ds, ds.x_train[idx], ds.y_train[idx]


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
