"""The adversary's declared knowledge of how a client turned the global model into its update.

An honest-but-curious aggregator wrote the FedAvg plan itself and sent it to
every client in the Join reply, so it knows the learning rate, momentum,
local epochs and batch size — and, since the plan's seed fixes each client's
shuffling, even the order of the client's mini-batches. What it does not know
is the client's data. An attack states what it assumes here, so a scorecard
row can say exactly which knowledge produced it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from securecollab.training import batch_order


@dataclass(frozen=True)
class LocalTraining:
    """Local SGD (with heavy-ball momentum, torch's convention) as the adversary believes the client ran it.

    ``batch_size=None`` means full batch. ``shuffle_seed=None`` means the
    adversary does not know the batch order and assumes consecutive slices;
    since dummy images are interchangeable this only loses information when
    batches are reshuffled between epochs.
    """

    lr: float
    momentum: float = 0.0
    epochs: int = 1
    batch_size: int | None = None
    shuffle_seed: int | None = None
    epoch_offset: int = 0

    def batches(self, num_examples: int, epoch: int) -> list[np.ndarray]:
        """Index batches of local epoch ``epoch`` (0-based) over ``num_examples`` examples."""
        size = self.batch_size or num_examples
        if self.shuffle_seed is None:
            order = np.arange(num_examples)
            return [order[i:i + size] for i in range(0, num_examples, size)]
        return batch_order(num_examples, size, self.shuffle_seed, self.epoch_offset + epoch)

    def num_steps(self, num_examples: int) -> int:
        """SGD steps the client takes in one round."""
        return self.epochs * math.ceil(num_examples / (self.batch_size or num_examples))

    def displacement_scale(self, num_examples: int) -> float:
        """How far the weights move per unit of a constant gradient: ``new - global = -scale * grad``.

        Exact for one step (momentum's buffer starts at the gradient itself);
        for several steps it is exact only if the gradient did not change.
        """
        m, steps = self.momentum, self.num_steps(num_examples)
        # step t moves by lr * (1 + m + ... + m^t) when the gradient is constant
        return self.lr * sum(sum(m ** k for k in range(t + 1)) for t in range(steps))


def local_training_from_plan(plan, client_index: int, round_: int) -> LocalTraining:
    """What the aggregator knows from its own FedAvgPlan about client ``client_index`` in round ``round_``.

    Mirrors the seeding of ``securecollab.protocols.fedavg.local_update``
    (client stream ``seed * 1000 + index``, epochs counted across rounds).
    """
    return LocalTraining(lr=plan.lr, momentum=plan.momentum, epochs=plan.local_epochs,
                         batch_size=plan.batch_size, shuffle_seed=plan.seed * 1000 + client_index,
                         epoch_offset=round_ * plan.local_epochs)
