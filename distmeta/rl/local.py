"""What a meta-RL step means, without Ray: the task generator, the workers and the server, and
one step through them (``MetaRLGroup.step``); ``LocalMetaRL`` runs them in this process, the
runtime (distributed.py) as actors, through the same calls.

    task generator --tasks--> workers (episodes, kept) --summaries--> server --metrics-->
                                 ^                                       |
                                 +---- sums over their tasks, on ask ----+

Step t draws its tasks from ``(seed, t)`` and task i's episodes from ``(seed, t, i)`` alone, so a
run is reproducible and takes the same step whether the meta-batch is one share or several (the
workers, each with its tasks). A step is a pure function of the seed, the step and the server's
``LearnerState`` (theta, and ProMP's Adam moments): a run resumes from it exactly.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from distmeta.rl.envs import Environment
from distmeta.rl.evaluate import adaptation_curve
from distmeta.rl.setup import MetaRLSetup
from distmeta.rl.trpo import MeanOverShares

EVAL_SPLITS = {"val": 0, "test": 1}  # the held-out streams: eval.seed's validation and test tasks


@dataclass(frozen=True)
class MetaRLMetrics:
    step: int
    return_before: float  # mean undiscounted return of the episodes before adaptation
    return_after: float  # ... and after the inner steps
    length_before: float  # mean episode length, before adaptation
    length_after: float
    entropy: float  # mean entropy of the pre-update policy's actions on its episodes
    loss_before: float  # the meta-objective before the meta-step
    loss_after: float
    kl: float  # mean KL divergence of the new adapted policies from those that collected the episodes
    backtracks: int  # TRPO's line search (ProMP: 0)
    accepted: bool  # TRPO: a step within the bound lowered the surrogate (ProMP: always)
    rejected: bool  # the step came out non-finite and was not applied
    environment_steps: int
    rollout_s: float  # the slowest worker's share: its episodes, inner step and meta-gradient terms
    learn_s: float  # the meta-step


@dataclass
class LearnerState:
    """The server's state after ``step`` meta-steps: all a run needs to continue exactly."""

    step: int
    theta: np.ndarray
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)  # ProMP: Adam's; TRPO: none
    rejected_steps: list[int] = field(default_factory=list)  # non-finite meta-steps, not applied

    def owned(self) -> LearnerState:
        """A copy with writable arrays of its own (Ray hands over read-only views of its buffers)."""
        optimizer = {key: value.copy() for key, value in self.optimizer.items()}
        return LearnerState(self.step, self.theta.copy(), optimizer, list(self.rejected_steps))


def task_rng(seed: int, step: int) -> np.random.Generator:
    """Step ``step``'s tasks."""
    return np.random.default_rng([seed, step, 0])


def rollout_rngs(seed: int, step: int, tasks: range) -> list[np.random.Generator]:
    """The actions and transitions of step ``step``'s tasks ``tasks`` (indices in its meta-batch)."""
    return [np.random.default_rng([seed, step, 1, task]) for task in tasks]


def held_out(env: type[Environment], seed: int, split: str, tasks: range) -> tuple[np.ndarray, list]:
    """Held-out tasks ``tasks`` (indices in the stream of ``seed``, ``eval.seed``, for ``split``) and
    their episodes' generators: task i from ``(seed, split, i)`` alone."""
    code = EVAL_SPLITS[split]
    drawn = np.concatenate([env.sample_tasks(np.random.default_rng([seed, code, 0, task]), 1) for task in tasks])
    return drawn, [np.random.default_rng([seed, code, 1, task]) for task in tasks]


def even_shares(num_tasks: int, parts: int) -> list[range]:
    """``num_tasks`` task indices in ``parts`` contiguous shares, as even as possible."""
    bounds = np.linspace(0, num_tasks, parts + 1).round().astype(int)
    return [range(lo, hi) for lo, hi in itertools.pairwise(bounds)]


class TaskStream:
    """The task generator: step t's meta-batch from ``(seed, t)``, so its cursor is the step. Tasks
    are a few numbers each (a goal, masses): drawing them costs microseconds."""

    def __init__(self, setup: MetaRLSetup):
        self.env, self.seed, self.size = setup.environment, setup.seed, setup.meta_batch_size

    def draw(self, step: int) -> np.ndarray:
        return self.env.sample_tasks(task_rng(self.seed, step), self.size)


@dataclass(frozen=True)
class ShareSummary:
    """A worker's account of its tasks' episodes at a step: sums over its tasks of each task's mean."""

    return_before: float  # undiscounted return before adaptation
    return_after: float  # ... after the inner steps
    length_before: float  # episode length
    length_after: float
    entropy: float  # the pre-update policy's, per step
    environment_steps: int
    rollout_s: float


class ShareWorker:
    """The tasks ``tasks`` (indices in every meta-batch) of a run: it collects their episodes at a
    step's parameters, keeps them, and answers the meta-step's questions about them with sums
    (``answer``). Numpy in and out, as a Ray actor passes them without copies."""

    def __init__(self, setup: MetaRLSetup, tasks: range, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.setup, self.tasks = setup, tasks
        self.learner, self.layout, _ = setup.build()
        self.problem = None

    def collect(self, step: int, tasks: np.ndarray, theta: np.ndarray) -> ShareSummary:
        """Roll out, adapt and roll out again for this worker's share of ``tasks`` (the step's meta-batch)."""
        start, learner = time.perf_counter(), self.learner
        flat = torch.tensor(theta)
        mine = tasks[self.tasks.start : self.tasks.stop]
        batch = learner.collect(self.layout.unflatten(flat), mine, rollout_rngs(self.setup.seed, step, self.tasks))
        self.problem = learner.share(self.layout, flat, batch)
        first, valid = batch.train[0], batch.valid
        entropy = first.step_mean(learner.policy.distribution(first.behaviour).entropy())
        return ShareSummary(
            float(first.returns().mean(1).sum()),
            float(valid.returns().mean(1).sum()),
            float(first.lengths.double().mean(1).sum()),
            float(valid.lengths.double().mean(1).sum()),
            float(entropy.sum()),
            int(sum(e.mask.sum() for e in [*batch.train, valid])),
            time.perf_counter() - start,
        )

    def answer(self, method: str, *args):
        """The share's answer to the meta-step's ``method`` (``ProblemShare``'s, or ProMP's)."""
        return to_numpy(getattr(self.problem, method)(*to_torch(tuple(args))))

    def evaluate(
        self, theta: np.ndarray, split: str, tasks: range, seed: int, step_sizes: list[float], episodes: int
    ) -> np.ndarray:
        """Held-out ``tasks``' mean returns after 0 .. len(step_sizes) inner steps, [T, steps + 1]."""
        drawn, rngs = held_out(self.setup.environment, seed, split, tasks)
        theta = self.layout.unflatten(torch.tensor(theta))
        return adaptation_curve(self.learner, theta, drawn, step_sizes, episodes, rngs)


def to_numpy(answer):
    if isinstance(answer, tuple):
        return tuple(to_numpy(a) for a in answer)
    return answer.detach().cpu().numpy() if isinstance(answer, Tensor) else answer


def to_torch(answer):
    if isinstance(answer, tuple):
        return tuple(to_torch(a) for a in answer)
    return torch.tensor(answer) if isinstance(answer, np.ndarray) else answer  # a copy: Ray's arrays are read-only


class MetaRLServer:
    """The parameter server of meta-RL: theta and the meta-step's own state (``LearnerState``).
    Each step it takes one meta-step (TRPO's or ProMP's), asking the workers for sums over their
    tasks through ``gather(method, *args)`` (their answers in worker order). A non-finite step is
    not applied."""

    def __init__(self, setup: MetaRLSetup, gather: Callable[..., list], state: LearnerState | None = None):
        self.setup, self.gather = setup, gather
        self.learner, self.layout, self.theta = setup.build()
        self.step, self.rejected_steps = 0, []
        if state is not None:
            self.restore(state)

    def parameters(self) -> np.ndarray:
        return self.theta.numpy()

    def state(self) -> LearnerState:
        optimizer = {key: value.numpy() for key, value in self.learner.optimizer_state().items()}
        return LearnerState(self.step, self.theta.numpy().copy(), optimizer, list(self.rejected_steps))

    def restore(self, state: LearnerState) -> None:
        self.theta = torch.tensor(state.theta, dtype=self.setup.dtype)
        optimizer = {key: torch.tensor(value) for key, value in state.optimizer.items()}
        self.learner.load_optimizer_state(self.theta, optimizer)
        self.step, self.rejected_steps = state.step, list(state.rejected_steps)

    def meta_step(self, step: int, *summaries: ShareSummary) -> tuple[MetaRLMetrics, LearnerState]:
        """Step ``step`` on the episodes the workers collected at theta (``summaries``: theirs)."""
        if step != self.step:
            raise RuntimeError(f"the server is at step {self.step}, asked for step {step}")
        start, before = time.perf_counter(), self.state()
        problem = MeanOverShares(
            lambda method, *args: to_torch(tuple(self.gather(method, *to_numpy(args)))), self.setup.meta_batch_size
        )
        result = self.learner.meta_step(self.theta, problem)
        rejected = (
            not result.finite or not bool(torch.isfinite(result.theta).all()) or not math.isfinite(result.loss_after)
        )
        if rejected:
            self.restore(before)
            self.rejected_steps.append(step)
        else:
            self.theta = result.theta.detach()
        self.step = step + 1
        tasks = self.setup.meta_batch_size
        metrics = MetaRLMetrics(
            step,
            sum(s.return_before for s in summaries) / tasks,
            sum(s.return_after for s in summaries) / tasks,
            sum(s.length_before for s in summaries) / tasks,
            sum(s.length_after for s in summaries) / tasks,
            sum(s.entropy for s in summaries) / tasks,
            result.loss_before,
            result.loss_after,
            result.kl,
            result.backtracks,
            result.accepted and not rejected,
            rejected,
            sum(s.environment_steps for s in summaries),
            max(s.rollout_s for s in summaries),
            time.perf_counter() - start,
        )
        return metrics, self.state()


class MetaRLGroup:
    """A generator, a server and workers, and a step through them. ``call(actor, method, *args)``
    starts a call (in this process: makes it) and ``get`` waits for what it returns; the actors'
    answers travel between them without the driver (Ray: object refs)."""

    setup: MetaRLSetup
    generator: TaskStream
    server: MetaRLServer
    workers: list[ShareWorker]

    def call(self, actor, method: str, *args):
        return getattr(actor, method)(*args)

    def get(self, result, timeout_s: float | None = None):
        return result

    def step(self, step: int, timeout_s: float | None = None) -> tuple[MetaRLMetrics, LearnerState]:
        tasks = self.call(self.generator, "draw", step)
        theta = self.call(self.server, "parameters")
        summaries = [self.call(worker, "collect", step, tasks, theta) for worker in self.workers]
        return self.get(self.call(self.server, "meta_step", step, *summaries), timeout_s)

    def run(self, steps: int) -> list[MetaRLMetrics]:
        start = self.get(self.call(self.server, "state")).step
        return [self.step(step)[0] for step in range(start, start + steps)]

    def evaluate(
        self,
        theta: np.ndarray,
        split: str,
        tasks: range,
        seed: int,
        step_sizes,
        episodes: int,
        timeout_s: float | None = None,
    ):
        """Held-out ``tasks``' mean returns after 0 .. len(step_sizes) inner steps, [T, steps + 1],
        split over the workers (the numbers do not depend on how); a worker that has not answered
        within ``timeout_s`` of the wait is a fault, as in a step."""
        shares = even_shares(len(tasks), min(len(self.workers), len(tasks)))
        parts = [
            self.call(worker, "evaluate", theta, split, tasks[s.start : s.stop], seed, step_sizes, episodes)
            for worker, s in zip(self.workers, shares)
        ]
        return np.concatenate([self.get(part, timeout_s) for part in parts])


class LocalMetaRL(MetaRLGroup):
    """Every actor in this process; the meta-batch in ``shares`` workers."""

    def __init__(self, setup: MetaRLSetup, shares: int = 1, state: LearnerState | None = None):
        self.setup = setup
        self.generator = TaskStream(setup)
        self.workers = [ShareWorker(setup, tasks) for tasks in even_shares(setup.meta_batch_size, shares)]
        gather = lambda method, *args: [worker.answer(method, *args) for worker in self.workers]  # noqa: E731
        self.server = MetaRLServer(setup, gather, state)

    @property
    def theta(self) -> Tensor:
        return self.server.theta

    @property
    def learner(self):
        return self.server.learner

    @property
    def layout(self):
        return self.server.layout
