"""Meta-RL in one process, without Ray: what a step means, for MAML-TRPO (a ``MamlTrpoConfig``) and
ProMP (a ``ProMPConfig``). Step t draws its tasks from ``(seed, t)`` and task i's rollouts from
``(seed, t, i)`` alone, so a run is reproducible, and gives the same step whether the meta-batch is
one share or several (``shares``: the runtime's workers, each with its tasks). A MAML-TRPO run
resumes at any step from the parameters (TRPO keeps no other state); ProMP's Adam moments live in
its learner."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

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


def even_shares(num_tasks: int, parts: int) -> list[range]:
    """``num_tasks`` task indices in ``parts`` contiguous shares, as even as possible."""
    bounds = np.linspace(0, num_tasks, parts + 1).round().astype(int)
    return [range(lo, hi) for lo, hi in itertools.pairwise(bounds)]


@dataclass(frozen=True)
class MetaRLSetup:
    """What a run's learner is built from, by the driver and by every worker alike."""

    env: str | type[Environment]
    cfg: MamlTrpoConfig | ProMPConfig
    meta_batch_size: int
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "tanh"
    seed: int = 0
    dtype: torch.dtype = torch.float32

    def build(self) -> tuple[MamlTrpo, ParamLayout, Tensor]:
        """The learner (its policy initialised under ``seed``), the parameters' layout, theta."""
        env = ENVIRONMENTS[self.env] if isinstance(self.env, str) else self.env
        torch.manual_seed(self.seed)
        policy = build_policy(env, self.hidden, self.activation).to(self.dtype)
        named = {n: p.detach() for n, p in policy.named_parameters()}
        learner = (ProMP if isinstance(self.cfg, ProMPConfig) else MamlTrpo)(self.cfg, policy, env)
        return learner, ParamLayout.of(named), flat_parameters(named, self.dtype)


@dataclass(frozen=True)
class ShareSummary:
    """A worker's account of its tasks' episodes at a step: sums over its tasks."""

    return_before: float  # of each task's mean undiscounted return before adaptation
    return_after: float  # ... after the inner steps
    environment_steps: int
    rollout_s: float


class ShareWorker:
    """The tasks ``tasks`` (indices in every meta-batch) of a run: it collects their episodes at a
    step's parameters, keeps them, and answers the meta-step's questions about them with sums
    (``answer``). In this process for ``LocalMetaRL``, a Ray actor for ``RayMetaRL``; numpy in and out."""

    def __init__(self, setup: MetaRLSetup, tasks: range):
        self.setup, self.tasks = setup, tasks
        self.learner, self.layout, _ = setup.build()
        self.problem = None

    def collect(self, step: int, theta: np.ndarray) -> ShareSummary:
        start, setup, learner = time.perf_counter(), self.setup, self.learner
        every_task = learner.env.sample_tasks(task_rng(setup.seed, step), setup.meta_batch_size)
        tasks = every_task[self.tasks.start : self.tasks.stop]
        flat = torch.tensor(theta)
        batch = learner.collect(self.layout.unflatten(flat), tasks, rollout_rngs(setup.seed, step, self.tasks))
        self.problem = learner.share(self.layout, flat, batch)
        return ShareSummary(
            float(batch.train[0].returns().mean(1).sum()),
            float(batch.valid.returns().mean(1).sum()),
            int(sum(e.mask.sum() for e in [*batch.train, batch.valid])),
            time.perf_counter() - start,
        )

    def answer(self, method: str, *args):
        """The share's answer to the meta-step's ``method`` (``ProblemShare``'s, or ProMP's)."""
        args = [torch.tensor(a) if isinstance(a, np.ndarray) else a for a in args]
        return to_numpy(getattr(self.problem, method)(*args))


def to_numpy(answer):
    if isinstance(answer, tuple):
        return tuple(to_numpy(a) for a in answer)
    return answer.detach().cpu().numpy() if isinstance(answer, Tensor) else answer


def to_torch(answer):
    if isinstance(answer, tuple):
        return tuple(to_torch(a) for a in answer)
    return torch.tensor(answer) if isinstance(answer, np.ndarray) else answer


class MetaRLLoop:
    """The driver's side of a run: each step, every worker collects its share of the meta-batch at
    theta, then the learner's meta-step asks the workers for sums (``MeanOverShares``) and moves
    theta. ``call(method, *args)`` calls ``method`` on every worker and returns their answers in order."""

    def __init__(self, setup: MetaRLSetup, call: Callable[..., list]):
        self.setup, self.call = setup, call
        self.learner, self.layout, self.theta = setup.build()
        self.policy, self.env = self.learner.policy, self.learner.env

    def step(self, step: int) -> MetaRLMetrics:
        start = time.perf_counter()
        summaries: list[ShareSummary] = self.call("collect", step, self.theta.numpy())
        collected = time.perf_counter()
        problem = MeanOverShares(self._gather, self.setup.meta_batch_size)
        result = self.learner.meta_step(self.theta, problem)
        self.theta = result.theta.detach()
        tasks = self.setup.meta_batch_size
        return MetaRLMetrics(
            step,
            sum(s.return_before for s in summaries) / tasks,
            sum(s.return_after for s in summaries) / tasks,
            result.loss_before,
            result.loss_after,
            result.kl,
            result.backtracks,
            result.accepted,
            sum(s.environment_steps for s in summaries),
            collected - start,
            time.perf_counter() - collected,
        )

    def _gather(self, method: str, *args) -> list:
        args = [a.detach().cpu().numpy() if isinstance(a, Tensor) else a for a in args]
        return [to_torch(answer) for answer in self.call("answer", method, *args)]

    def run(self, steps: int) -> list[MetaRLMetrics]:
        return [self.step(step) for step in range(steps)]


class LocalMetaRL(MetaRLLoop):
    """Every worker in this process; ``shares`` of them."""

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
        setup = MetaRLSetup(env, cfg, meta_batch_size, hidden, activation, seed, dtype)
        self.workers = [ShareWorker(setup, tasks) for tasks in even_shares(meta_batch_size, shares)]
        super().__init__(setup, lambda method, *args: [getattr(w, method)(*args) for w in self.workers])
