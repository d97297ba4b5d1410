"""Untargeted model poisoning: make the aggregate useless (Fang et al. 2020; Baruch et al. 2019 for the scale)."""

from __future__ import annotations

import numpy as np

from securecollab.poisoning import Behaviour, register_behaviour


@register_behaviour("sign_flip", "model_poisoning")
class SignFlip(Behaviour):
    """The honest delta, reversed and scaled: gradient ascent on the federation's loss."""

    default_factor = 10.0

    def update(self, delta, rng):
        return -self.factor * delta


@register_behaviour("scale", "model_poisoning")
class Scale(Behaviour):
    """The honest delta, scaled up: the aggregate overshoots."""

    default_factor = 100.0

    def update(self, delta, rng):
        return self.factor * delta


@register_behaviour("random", "model_poisoning")
class RandomUpdate(Behaviour):
    """Gaussian noise with `factor` times the honest delta's norm."""

    default_factor = 10.0

    def update(self, delta, rng):
        noise = rng.standard_normal(delta.shape)
        return noise / np.linalg.norm(noise) * self.factor * np.linalg.norm(delta)
