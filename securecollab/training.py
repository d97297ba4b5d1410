"""Plain local training and evaluation, shared by centralized training and every protocol's clients."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of local training; identical for a protocol and its plain baseline."""

    epochs: int = 1
    lr: float = 0.05
    batch_size: int = 32
    momentum: float = 0.9
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The index batches of one epoch; a pure function of (n, seed, epoch) so any party can replay it."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def step_batches(n: int, batch_size: int, seed: int, first: int, count: int) -> list[np.ndarray]:
    """Mini-batches number first .. first+count-1 of the endless run of epochs (`batch_order` after each other)."""
    per_epoch = -(-n // batch_size)
    return [batch_order(n, batch_size, seed, s // per_epoch)[s % per_epoch] for s in range(first, first + count)]


def train_local(model: nn.Module, x: np.ndarray, y: np.ndarray, cfg: TrainConfig,
                *, epoch_offset: int = 0, steps: tuple[int, int] | None = None, progress=None) -> float:
    """SGD with momentum over (x, y) for cfg.epochs epochs; returns the mean loss of the last epoch.

    With `steps=(first, count)` it takes exactly those mini-batch steps instead (FedSGD-style rounds)."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    last = float("nan")
    for e in range(1 if steps else cfg.epochs):
        total, count = 0.0, 0
        batches = (step_batches(len(x), cfg.batch_size, cfg.seed, *steps) if steps
                   else batch_order(len(x), cfg.batch_size, cfg.seed, epoch_offset + e))
        for idx in batches:
            idx = torch.from_numpy(idx)
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        last = total / max(count, 1)
        if progress:
            progress(e + 1, last)
    return last


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    model.eval()
    out = [model(torch.from_numpy(x[i:i + batch_size])) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict_logits(model, x).argmax(1) == y).mean())


@contextmanager
def one_thread():
    """Torch on one thread for tiny models: on a shared 2-core machine, thread hand-offs cost far more than
    they save (attack code measured 5-25x slower training with two contending threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
