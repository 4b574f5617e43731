"""Held-out evaluation of a meta-RL policy, the MAML paper's protocol for 2-D navigation: for each
test task, the average return of fresh episodes after 0, 1, ..., N policy-gradient steps, each step
taken on the episodes of the policy before it (40 per task in the paper; step size 0.1, then 0.05).
Means with 95% confidence intervals over the test tasks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distmeta.rl.episodes import rollout, with_advantages
from distmeta.rl.maml_trpo import MamlTrpo
from distmeta.rl.policies import per_task

Z95 = 1.959963984540054


@dataclass(frozen=True)
class AdaptationCurve:
    returns: np.ndarray  # [tasks, steps + 1]: each task's mean return after k steps

    @property
    def mean(self) -> np.ndarray:
        return self.returns.mean(0)

    @property
    def ci95(self) -> np.ndarray:
        """Half-width of the normal 95% interval of the mean over tasks."""
        return Z95 * self.returns.std(0, ddof=1) / np.sqrt(len(self.returns))


def adaptation_curve(
    learner: MamlTrpo,
    theta: dict[str, torch.Tensor],
    tasks: np.ndarray,
    step_sizes: list[float],
    episodes: int,
    rngs: list[np.random.Generator],
) -> AdaptationCurve:
    """Returns after 0 .. len(step_sizes) inner steps, the i-th with ``step_sizes[i]``."""
    cfg = learner.cfg
    params = per_task(theta, len(tasks))
    returns = []
    for step_size in [*step_sizes, None]:
        collected = rollout(learner.policy, params, learner.env, tasks, episodes, rngs)
        returns.append(collected.returns().mean(1))
        if step_size is None:
            break
        collected = with_advantages(collected, cfg.gamma, cfg.gae_lambda)
        params = learner.detached_step(params, collected, lr=step_size)
    return AdaptationCurve(torch.stack(returns, 1).double().cpu().numpy())
