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

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "FedAvgPlan":
        return cls(**json.loads(text))

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


def client_data(plan: FedAvgPlan, index: int):
    """The training shard client `index` holds (a seeded partition of the embedded data set)."""
    ds = load_dataset(plan.dataset, seed=plan.seed, path=plan.dataset_path)
    parts = partition(ds.y_train, plan.num_clients, plan.partition, seed=plan.seed, alpha=plan.alpha)
    idx = np.sort(parts[index])
    return ds, ds.x_train[idx], ds.y_train[idx]


def local_update(model, plan: FedAvgPlan, round_: int, global_params, x, y, client_index: int):
    """One client's round: load the global model, train locally, return the new weights."""
    load_arrays(model, global_params)
    cfg = plan.train_config()
    # Each client shuffles with its own stream; rounds continue the epoch count.
    cfg = TrainConfig(**{**cfg.to_dict(), "seed": plan.seed * 1000 + client_index})
    train_local(model, x, y, cfg, epoch_offset=round_ * plan.local_epochs)
    return parameters_to_arrays(model)
