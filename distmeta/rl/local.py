"""Meta-RL in one process, without Ray: what a step means, for MAML-TRPO (a ``MamlTrpoConfig``) and
ProMP (a ``ProMPConfig``). Step t draws its tasks from ``(seed, t)`` and task i's rollouts from
``(seed, t, i)`` alone, so a run is reproducible, and gives the same step whether the meta-batch is
one share or several (``shares``: the runtime's workers, each with its tasks). A MAML-TRPO run
resumes at any step from the parameters (TRPO keeps no other state); ProMP's Adam moments live in
its learner."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
import torch

from distmeta.params import ParamLayout, flat_parameters
from distmeta.rl.envs import ENVIRONMENTS, Environment
from distmeta.rl.maml_trpo import MamlTrpo, MamlTrpoConfig
from distmeta.rl.policies import build_policy
from distmeta.rl.promp import ProMP, ProMPConfig
from distmeta.rl.trpo import MeanOverShares


@dataclass(frozen=True)
class MetaRLMetrics:
    step: int
    return_before: float  # mean undiscounted return of the episodes before adaptation
    return_after: float  # ... and after the inner steps
    loss_before: float  # the meta-objective before the meta-step
    loss_after: float
    kl: float  # mean KL divergence of the new adapted policies from those that collected the episodes
    backtracks: int  # TRPO's line search (ProMP: 0)
    accepted: bool  # TRPO: a step within the bound lowered the surrogate (ProMP: always)
    environment_steps: int
    rollout_s: float
    learn_s: float


def task_rng(seed: int, step: int) -> np.random.Generator:
    """Step ``step``'s tasks."""
    return np.random.default_rng([seed, step, 0])


def rollout_rngs(seed: int, step: int, tasks: range) -> list[np.random.Generator]:
    """The actions and transitions of step ``step``'s tasks ``tasks`` (indices in its meta-batch)."""
    return [np.random.default_rng([seed, step, 1, task]) for task in tasks]


class LocalMetaRL:
    def __init__(
        self,
        env: str | type[Environment],
        cfg: MamlTrpoConfig | ProMPConfig,
        meta_batch_size: int,
        hidden: tuple[int, ...] = (64, 64),
        activation: str = "tanh",
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        shares: int = 1,
    ):
        self.env = ENVIRONMENTS[env] if isinstance(env, str) else env
        self.cfg, self.meta_batch_size, self.seed = cfg, meta_batch_size, seed
        bounds = np.linspace(0, meta_batch_size, shares + 1).round().astype(int)
        self.shares = [range(lo, hi) for lo, hi in itertools.pairwise(bounds)]
        torch.manual_seed(seed)
        self.policy = build_policy(self.env, hidden, activation).to(dtype)
        named = {n: p.detach() for n, p in self.policy.named_parameters()}
        self.layout = ParamLayout.of(named)
        self.theta = flat_parameters(named, dtype)
        self.learner = (ProMP if isinstance(cfg, ProMPConfig) else MamlTrpo)(cfg, self.policy, self.env)

    def step(self, step: int) -> MetaRLMetrics:
        start = time.perf_counter()
        tasks = self.env.sample_tasks(task_rng(self.seed, step), self.meta_batch_size)
        theta = self.layout.unflatten(self.theta)
        batches = [
            self.learner.collect(theta, tasks[share.start : share.stop], rollout_rngs(self.seed, step, share))
            for share in self.shares
        ]
        collected = time.perf_counter()
        problem = MeanOverShares.local([self.learner.share(self.layout, self.theta, b) for b in batches])
        result = self.learner.meta_step(self.theta, problem)
        self.theta = result.theta.detach()
        episodes = [e for b in batches for e in [*b.train, b.valid]]
        return MetaRLMetrics(
            step,
            float(torch.cat([b.train[0].returns() for b in batches]).mean()),
            float(torch.cat([b.valid.returns() for b in batches]).mean()),
            result.loss_before,
            result.loss_after,
            result.kl,
            result.backtracks,
            result.accepted,
            int(sum(e.mask.sum() for e in episodes)),
            collected - start,
            time.perf_counter() - collected,
        )

    def run(self, steps: int) -> list[MetaRLMetrics]:
        return [self.step(step) for step in range(steps)]
