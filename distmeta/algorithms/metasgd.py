"""Meta-SGD (Li et al., 2017): MAML with one learned inner learning rate per parameter entry.

The rates are meta-parameters like the initialisation (``inner_lr.<parameter name>``, starting at
``algorithm.inner_lr``); the inner step is theta - alpha * grad, elementwise, and the meta-gradient
reaches alpha through the adapted parameters (second order, as MAML)."""

from __future__ import annotations

import torch

from distmeta.algorithms.maml import MAML

PREFIX = "inner_lr."


class MetaSGD(MAML):
    learned_inner_lr = True

    def initial_parameters(self):
        weights = super().initial_parameters()
        return weights | {PREFIX + n: torch.full_like(p, self.cfg.inner_lr) for n, p in weights.items()}

    def inner_loop(self, theta, tasks):
        loop = super().inner_loop(theta, tasks)
        loop.lr = {n: theta[PREFIX + n] for n in self.model_names}
        return loop
