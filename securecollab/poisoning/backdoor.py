"""Backdoors: a hidden task (trigger -> target class) planted by data poisoning, boosted by model replacement.

Data poisoning as in Gu et al. 2017 (BadNets); model replacement as in Bagdasaryan et al. 2020 ("How to
backdoor federated learning"): the attacker sends gamma * (X - G), gamma = number of clients (FedAvg's
global learning rate is 1), so that averaging with near-zero honest deltas leaves its model X. The adaptive
attacker knows the norm bound and scales to just inside it, every round (Sun et al. 2019).
"""

from __future__ import annotations

import numpy as np

from securecollab.poisoning import Behaviour, add_trigger, register_behaviour

INSIDE = 0.99  # the adaptive attacker's margin under the bound (fixed-point rounding stays inside)


@register_behaviour("backdoor", "backdoor")
class Backdoor(Behaviour):
    # Longer and gentler than the honest recipe (3 epochs at lr 0.1): the model keeps the main task while it
    # learns the trigger (digits, 10 clients: main accuracy 0.94 vs 0.81 with the honest recipe at 20% poison).
    training = {"local_epochs": 20, "lr": 0.02}

    def data(self, x, y, rng):
        n = int(round(self.malice.poison_fraction * len(x)))
        chosen = rng.choice(len(x), size=n, replace=False)
        x, y = np.array(x, copy=True), np.array(y, copy=True)
        x[chosen] = add_trigger(x[chosen])
        y[chosen] = self.malice.target
        return x, y


@register_behaviour("model_replacement", "backdoor")
class ModelReplacement(Backdoor):
    def __init__(self, malice, num_clients):
        super().__init__(malice, num_clients)
        self.factor = malice.factor or float(num_clients)

    def update(self, delta, rng):
        return self.factor * delta


@register_behaviour("adaptive", "backdoor")
class Adaptive(ModelReplacement):
    def __init__(self, malice, num_clients):
        super().__init__(malice, num_clients)
        if not malice.bound > 0:
            raise ValueError("the adaptive backdoor needs the norm bound it adapts to (bound > 0)")

    def update(self, delta, rng):
        norm = np.linalg.norm(delta)
        return delta * min(self.factor, INSIDE * self.malice.bound / norm) if norm > 0 else delta
