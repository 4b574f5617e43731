"""MAML-TRPO in one process, without Ray: what a meta-RL step means. Step t draws its tasks and
its rollouts' randomness from ``(seed, t)`` alone, so a run is reproducible and can resume at any
step from the parameters; the runtime's workers and server move these same objects."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from distmeta.params import ParamLayout, flat_parameters
from distmeta.rl.envs import ENVIRONMENTS
from distmeta.rl.maml_trpo import MamlTrpo, MamlTrpoConfig, MamlTrpoProblem
from distmeta.rl.policies import build_policy
from distmeta.rl.trpo import trust_region_step


@dataclass(frozen=True)
class MetaRLMetrics:
    step: int
    return_before: float  # mean undiscounted return of the episodes before adaptation
    return_after: float  # ... and after the inner steps
    loss_before: float  # the surrogate before the meta-step
    loss_after: float
    kl: float
    backtracks: int
    accepted: bool
    environment_steps: int
    rollout_s: float
    learn_s: float


def task_rng(seed: int, step: int) -> np.random.Generator:
    """Step ``step``'s tasks."""
    return np.random.default_rng([seed, step, 0])


def rollout_rng(seed: int, step: int) -> np.random.Generator:
    """Step ``step``'s actions and transitions."""
    return np.random.default_rng([seed, step, 1])


class LocalMetaRL:
    def __init__(
        self,
        env: str,
        cfg: MamlTrpoConfig,
        meta_batch_size: int,
        hidden: tuple[int, ...] = (64, 64),
        activation: str = "tanh",
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ):
        self.env, self.cfg, self.meta_batch_size, self.seed = ENVIRONMENTS[env], cfg, meta_batch_size, seed
        torch.manual_seed(seed)
        self.policy = build_policy(self.env, hidden, activation).to(dtype)
        named = {n: p.detach() for n, p in self.policy.named_parameters()}
        self.layout = ParamLayout.of(named)
        self.theta = flat_parameters(named, dtype)
        self.learner = MamlTrpo(cfg, self.policy, self.env)

    def step(self, step: int) -> MetaRLMetrics:
        start = time.perf_counter()
        tasks = self.env.sample_tasks(task_rng(self.seed, step), self.meta_batch_size)
        batch = self.learner.collect(self.layout.unflatten(self.theta), tasks, rollout_rng(self.seed, step))
        collected = time.perf_counter()
        cfg = self.cfg
        problem = MamlTrpoProblem(self.learner, self.layout, self.theta, batch)
        result = trust_region_step(
            self.theta, problem, cfg.max_kl, cfg.cg_iters, cfg.cg_damping, cfg.ls_max_steps, cfg.ls_backtrack_ratio
        )
        self.theta = result.theta.detach()
        environment_steps = int(sum(e.mask.sum() for e in [*batch.train, batch.valid]))
        return MetaRLMetrics(
            step,
            float(batch.train[0].returns().mean()),
            float(batch.valid.returns().mean()),
            result.loss_before,
            result.loss_after,
            result.kl,
            result.backtracks,
            result.accepted,
            environment_steps,
            collected - start,
            time.perf_counter() - collected,
        )

    def run(self, steps: int) -> list[MetaRLMetrics]:
        return [self.step(step) for step in range(steps)]
