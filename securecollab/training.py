"""Plain local training and evaluation, shared by centralized training and every protocol's clients."""

from __future__ import annotations

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


def train_local(model: nn.Module, x: np.ndarray, y: np.ndarray, cfg: TrainConfig,
                *, epoch_offset: int = 0, progress=None) -> float:
    """SGD with momentum over (x, y) for cfg.epochs epochs; returns the mean loss of the last epoch."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    last = float("nan")
    for e in range(cfg.epochs):
        total, count = 0.0, 0
        for idx in batch_order(len(x), cfg.batch_size, cfg.seed, epoch_offset + e):
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
