"""Plans: the public recipe of a protocol run (model, data, partition, schedule), as frozen dataclasses.

A plan is what every party of a run is told (clients receive it when they
join), so it is also public knowledge for the attacks. Plans share their
common fields and their JSON form through two small bases; each protocol's
plan adds only its own fields.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from securecollab.data import Dataset, load_dataset, partition
from securecollab.models import UpdateVector, build_model, count_parameters, load_arrays, parameters_to_arrays
from securecollab.training import TrainConfig, train_local


class JsonPlan:
    """JSON round trip for a frozen dataclass plan."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**d)


@dataclass(frozen=True)
class ModelPlan(JsonPlan):
    """Which model is trained on which data, and how (the fields every plan has)."""

    model: str = "mlp"
    dataset: str = "digits"
    dataset_path: str | None = None
    activation: str = "relu"
    lr: float = 0.1
    momentum: float = 0.9
    batch_size: int = 32
    seed: int = 0

    def load_data(self) -> Dataset:
        return load_dataset(self.dataset, seed=self.seed, path=self.dataset_path)

    def build_model(self, ds: Dataset | None = None):
        """The plan's model, initialised from the seed."""
        ds = ds or self.load_data()
        return build_model(self.model, ds.input_shape, ds.num_classes, activation=self.activation, seed=self.seed)


@dataclass(frozen=True)
class ShardedPlan(ModelPlan):
    """A plan whose training data is partitioned over `num_clients` clients."""

    num_clients: int = 4
    partition: str = "iid"
    alpha: float = 0.5
    record_transcripts: bool = True

    def client_ids(self) -> list[str]:
        return [f"client-{i}" for i in range(self.num_clients)]

    def shard_indices(self, index: int, ds: Dataset | None = None) -> np.ndarray:
        """Indices into the training split of the examples client `index` holds (a seeded partition)."""
        ds = ds or self.load_data()
        parts = partition(ds.y_train, self.num_clients, self.partition, seed=self.seed, alpha=self.alpha)
        return np.sort(parts[index])


@dataclass(frozen=True)
class FedAvgPlan(ShardedPlan):
    """Everything a FedAvg client needs to take part; sent to it in the Join reply."""

    # Tuned so FedAvg over 4 IID clients matches centralized training of the
    # same epochs on digits (both ~0.97).
    rounds: int = 10
    local_epochs: int = 3
    # Benchmarks only: the "model" is one vector of this many floats and
    # clients submit ready-made updates instead of training.
    vector_length: int = 0
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
    # Plain FedAvg only: the aggregator drops (norm_mode "reject") or clips ("clip") updates whose delta's
    # L2 norm is above this (0: none), or weighs them with a robust rule ("fltrust"), in the clear (update
    # analysis: it sees every update). Secure aggregation's are SecAggPlan.norm_bound/norm_mode/robust.
    norm_bound: float = 0.0
    norm_mode: str = "reject"
    robust: str = ""
    # FLTrust's root data set: this many training examples the aggregator (the coordinator) holds itself,
    # drawn uniformly from the training split as in the paper; its own update sets the trust direction.
    root_samples: int = 100

    def __post_init__(self):
        if self.norm_bound < 0:
            raise ValueError("norm_bound must be >= 0")
        check_robustness(self.norm_bound, self.norm_mode, self.robust)
        if self.root_samples < 1:
            raise ValueError("root_samples must be >= 1")
        if self.samples_per_client < 0 or self.local_steps < 0:
            raise ValueError("samples_per_client and local_steps must be >= 0")
        if self.dp_noise_multiplier < 0 or self.dp_max_grad_norm <= 0 or not 0 < self.dp_delta < 1:
            raise ValueError("DP-SGD needs dp_noise_multiplier >= 0, dp_max_grad_norm > 0 and 0 < dp_delta < 1")
        if self.dp_noise_multiplier and self.local_steps:
            raise ValueError("DP-SGD samples its batches (Poisson): it trains whole local epochs, not local_steps")

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

    def shard_indices(self, index: int, ds: Dataset | None = None) -> np.ndarray:
        idx = super().shard_indices(index, ds)
        return idx[:self.samples_per_client] if self.samples_per_client else idx

    def build_model(self, ds: Dataset | None = None):
        if self.vector_length:
            return UpdateVector(self.vector_length)
        return super().build_model(ds)

    def update_length(self) -> int:
        """How long a client's update vector is: the model's parameters and the count coordinate after them
        (a benchmark's ``vector_length`` counts that coordinate already)."""
        return self.vector_length or count_parameters(self.build_model()) + 1


def root_data(plan: FedAvgPlan):
    """The aggregator's FLTrust root data set: `root_samples` training examples, a seeded uniform draw."""
    ds = plan.load_data()
    idx = np.sort(np.random.default_rng([plan.seed, 7]).choice(len(ds.y_train), plan.root_samples, replace=False))
    return ds, ds.x_train[idx], ds.y_train[idx]


NORM_MODES = ("reject", "clip")
ROBUST_RULES = ("", "fltrust")


def check_robustness(norm_bound: float, norm_mode: str, robust: str) -> None:
    if norm_mode not in NORM_MODES:
        raise ValueError(f"norm_mode must be one of {NORM_MODES}, not {norm_mode!r}")
    if robust not in ROBUST_RULES:
        raise ValueError(f"robust must be one of {ROBUST_RULES[1:]} (or empty), not {robust!r}")
    if robust and norm_bound:
        raise ValueError(f"{robust} normalises every update itself: do not combine it with a norm bound")


def client_data(plan: FedAvgPlan, index: int):
    """The data set and the training shard client `index` holds."""
    ds = plan.load_data()
    idx = plan.shard_indices(index, ds)
    return ds, ds.x_train[idx], ds.y_train[idx]


MPC_TRANSPORTS = ("grpc", "gloo")


@dataclass(frozen=True)
class SecAggPlan(JsonPlan):
    """How rounds are secured; the training itself is the FedAvg plan's."""

    training: FedAvgPlan = field(default_factory=FedAvgPlan)
    n_parties: int = 3
    seed_compression: bool = True
    min_clients: int = 2
    upload_deadline_s: float = 120.0
    norm_bound: float = 0.0   # 0: no bound; otherwise reject (or clip) updates with a larger L2 norm, inside MPC
    norm_mode: str = "reject"  # reject | clip: what the bound does to an update above it
    robust: str = ""          # "" | fltrust: trust scores against the coordinator's root update, inside MPC
    dp_sigma: float = 0.0     # 0: no noise; otherwise distributed Gaussian noise on the aggregate
    max_aborted_rounds: int = 3      # rounds a failed compute party may cost before training stops
    party_recovery_s: float = 600.0  # how long an aborted round waits for its parties to serve again
    # grpc: the parties' MPC over mutual TLS. gloo: CrypTen's plaintext torch.distributed world, INSECURE
    # (anyone on the link sees the opened values; anyone reaching the rendezvous can join): comparison only.
    mpc_transport: str = "grpc"
    # A plain sum (no norm bound, FLTrust or noise) travels in Z_2^32: 4-byte words, if every update keeps
    # |x| < 2^15 / num_clients (honest clients refuse larger ones; from 2^15 clients on, where even the count
    # of 1 would not fit, the 64-bit ring). False: always the 64-bit ring.
    narrow_ring: bool = True

    def __post_init__(self):
        if self.training.norm_bound or self.training.robust or self.training.norm_mode != "reject":
            raise ValueError("secure aggregation bounds norms and weighs updates inside MPC: set SecAggPlan's "
                             "norm_bound, norm_mode and robust, not the training plan's")
        check_robustness(self.norm_bound, self.norm_mode, self.robust)
        if not 0 <= self.dp_sigma < float("inf"):  # refused at start, not at the first aggregation
            raise ValueError(f"dp_sigma must be finite and >= 0, got {self.dp_sigma}")
        if self.mpc_transport not in MPC_TRANSPORTS:
            raise ValueError(f"mpc_transport must be one of {MPC_TRANSPORTS}, not {self.mpc_transport!r}")

    @classmethod
    def from_dict(cls, d: dict) -> SecAggPlan:
        return cls(**{**d, "training": FedAvgPlan.from_dict(d["training"])})

    @property
    def needs_dealer(self) -> bool:
        # Sums are local; norms need multiplications, hence Beaver triples from a dealer.
        return self.norm_bound > 0 or bool(self.robust)

    @property
    def share_bits(self) -> int:
        """The ring of shares on the wire: 32 bits for a plain sum (narrow_ring), else CrypTen's 64."""
        plain_sum = not self.needs_dealer and not self.dp_sigma
        return 32 if self.narrow_ring and plain_sum and self.training.num_clients < 1 << 15 else 64


SPLIT_MODES = ("vanilla", "ushaped")
CLIENT_WEIGHTS = ("handoff", "per_client")


@dataclass(frozen=True)
class SplitPlan(ShardedPlan):
    """Split learning: where the model is cut, who holds the labels, and the client-side defences."""

    num_clients: int = 2
    epochs: int = 30
    cut: str | None = None           # bottom | top; default: the model's default cut
    mode: str = "vanilla"
    head_cut: str | None = None      # U-shaped: middle | head; default: the last cut after `cut`
    client_weights: str = "handoff"
    noise_sigma: float = 0.0         # Gaussian noise on the activations sent
    nopeek_alpha: float = 0.0        # weight of the distance-correlation penalty

    def __post_init__(self):
        if self.mode not in SPLIT_MODES:
            raise ValueError(f"mode must be one of {SPLIT_MODES}, got {self.mode!r}")
        if self.client_weights not in CLIENT_WEIGHTS:
            raise ValueError(f"client_weights must be one of {CLIENT_WEIGHTS}, got {self.client_weights!r}")
        if self.noise_sigma < 0 or self.nopeek_alpha < 0:
            raise ValueError("noise_sigma and nopeek_alpha must be >= 0")

    @property
    def hands_off(self) -> bool:
        """Client-side weights pass between clients (a single client simply keeps them)."""
        return self.client_weights == "handoff" and self.num_clients > 1

    def parts(self, model):
        """(bottom, server part, head or None) sharing ``model``'s modules."""
        cut = self.cut or model.default_cut
        if cut not in model.cut_points:
            raise ValueError(f"unknown cut {cut!r}; choose one of {', '.join(model.cut_points)}")
        layers = list(model.children())
        i = model.cut_points[cut]
        if self.mode == "vanilla":
            return nn.Sequential(*layers[:i]), nn.Sequential(*layers[i:]), None
        later = [name for name, j in model.cut_points.items() if j > i]
        head_cut = self.head_cut or (max(later, key=model.cut_points.get) if later else None)
        if head_cut is None or model.cut_points.get(head_cut, -1) <= i:
            raise ValueError(f"U-shaped mode needs a head cut after {cut!r}; choose one of {later or 'none'}")
        j = model.cut_points[head_cut]
        return nn.Sequential(*layers[:i]), nn.Sequential(*layers[i:j]), nn.Sequential(*layers[j:])

    def shard(self, index: int, ds: Dataset | None = None):
        """(x, y) of client ``index``: a seeded partition of the training set, in index order."""
        ds = ds or self.load_data()
        idx = self.shard_indices(index, ds)
        return ds.x_train[idx], ds.y_train[idx]


def split_plan_of(plan: FedAvgPlan, **overrides) -> SplitPlan:
    """The split-learning plan matching a FedAvg plan: same model, data, seed and total epochs."""
    return SplitPlan(**{"model": plan.model, "dataset": plan.dataset, "dataset_path": plan.dataset_path,
                        "activation": plan.activation, "num_clients": plan.num_clients,
                        "epochs": plan.rounds * plan.local_epochs, "lr": plan.lr, "momentum": plan.momentum,
                        "batch_size": plan.batch_size, "seed": plan.seed, "partition": plan.partition,
                        "alpha": plan.alpha, **overrides})


@dataclass(frozen=True)
class ServedModelPlan(ModelPlan):
    """A model trained once in plaintext by its owner and then served for inference."""

    epochs: int = 30

    def learning_rate(self, ds: Dataset) -> float:
        return self.lr

    def train(self, ds: Dataset | None = None, *, seed: int | None = None):
        """(model, dataset): trained in plaintext, deterministically from the plan's seed, or from ``seed`` (the
        initial weights and batch order only; the data split stays the plan's): an owner whose weights must stay
        secret trains from a secret seed, or anyone given the plan could train the very same model."""
        ds = ds or self.load_data()
        seed = self.seed if seed is None else seed
        model = build_model(self.model, ds.input_shape, ds.num_classes, activation=self.activation, seed=seed)
        train_local(model, ds.x_train, ds.y_train, TrainConfig(
            epochs=self.epochs, lr=self.learning_rate(ds), momentum=self.momentum, batch_size=self.batch_size,
            seed=seed))
        if not all(np.isfinite(a).all() for _, a in parameters_to_arrays(model)):
            raise ValueError("training diverged (non-finite weights); lower the learning rate")
        return model, ds

    def load(self, weights: Path, ds: Dataset | None = None):
        """(model, dataset) with weights from an .npz (numpy only, no pickle)."""
        ds = ds or self.load_data()
        model = self.build_model(ds)
        with np.load(weights, allow_pickle=False) as f:
            load_arrays(model, [(k, f[k]) for k in f.files])
        return model, ds


@dataclass(frozen=True)
class HEModelPlan(ServedModelPlan):
    """Which model the HE server serves and how it is trained (square activations keep it polynomial)."""

    model: str = "convnet"
    activation: str = "square"
    # x^2 networks diverge at the ReLU models' lr 0.1; 0.01 and 30 epochs reach ~0.98 on digits. 0 = by image
    # size: 0.01 below 16 pixels, 0.003 / channels from 16 up, where the convnet's 7x7 convolution sums 49 pixels
    # per channel and x^2 diverges sooner (`securecollab make-npz`: 28x28 gray diverges at 0.01 and gives 0.973
    # at 0.003; RGB diverges at 0.003 and gives 0.964 at 0.001).
    lr: float = 0.0

    def learning_rate(self, ds: Dataset) -> float:
        if self.lr:
            return self.lr
        if ds.is_image and min(ds.input_shape[1:]) >= 16:
            return 0.003 / ds.input_shape[0]
        return 0.01


MPC_OUTPUTS = ("logits", "label")


@dataclass(frozen=True)
class MpcInferencePlan(ServedModelPlan):
    """Model-private inference: `n_parties` compute parties hold shares of the owner's weights and of each query,
    evaluate the model in MPC (ReLU networks too) and return shares of `output` to the querying client alone:
    the logits, or only the label (argmax computed in MPC). The deployment chooses; a client cannot."""

    model: str = "convnet"
    activation: str = "relu"
    lr: float = 0.03  # digits' test set: convnet 0.969, mlp 0.978 (0.1 gives 0.942 and 0.976)
    epochs: int = 20
    n_parties: int = 3  # 3: truncation with the dealer's help is exact; 2: local, fails with tiny probability
    output: str = "label"
    max_batch: int = 512

    def __post_init__(self):
        if self.output not in MPC_OUTPUTS:
            raise ValueError(f"output is one of {MPC_OUTPUTS}, not {self.output!r}")
        if self.n_parties not in (2, 3):
            raise ValueError(f"n_parties is 2 or 3, not {self.n_parties}")
        if self.activation not in ("relu", "square"):
            raise ValueError(f"activation {self.activation!r} is not evaluated in MPC (relu or square)")
        if not 1 <= self.max_batch <= 4096:
            raise ValueError(f"max_batch is 1..4096, not {self.max_batch}")

    def public_json(self) -> str:
        """What the compute parties tell anyone who asks: the architecture and the service, not the training
        recipe (the owner's business; with its seed anyone could train the same weights)."""
        return json.dumps({k: getattr(self, k) for k in ("model", "activation", "dataset", "n_parties", "output",
                                                          "max_batch")})


def save_weights(model, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **dict(parameters_to_arrays(model)))
