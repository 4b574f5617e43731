"""Held-out evaluation of a meta-RL policy, the MAML paper's protocol for 2-D navigation: for each
test task, the average return of fresh episodes after 0, 1, ..., N policy-gradient steps, each step
taken on the episodes of the policy before it (40 per task in the paper; step size 0.1, then 0.05).
Means with 95% confidence intervals over the test tasks.

Held-out task i of a split, and its episodes, come from ``(eval.seed, split, i)`` alone, so the
numbers are the same whichever worker scores it and in whichever chunk."""

from __future__ import annotations

import time
from typing import TextIO

import numpy as np
import torch

from distmeta.config import Config
from distmeta.report import EvalRow, report_progress, scored_row
from distmeta.rl.episodes import rollout, with_advantages
from distmeta.rl.maml_trpo import MamlTrpo
from distmeta.rl.policies import per_task
from distmeta.rl.setup import eval_episodes, eval_step_sizes, eval_steps

CHUNK_TASKS = 20  # held-out tasks per call, between progress reports


def adaptation_curve(
    learner: MamlTrpo,
    theta: dict[str, torch.Tensor],
    tasks: np.ndarray,
    step_sizes: list[float],
    episodes: int,
    rngs: list[np.random.Generator],
) -> np.ndarray:
    """Each task's mean return after 0 .. len(step_sizes) inner steps, the i-th with
    ``step_sizes[i]``: [tasks, steps + 1]."""
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
    return torch.stack(returns, 1).double().cpu().numpy()


def protocol(cfg: Config, split: str, num_tasks: int) -> str:
    """The meta-RL evaluation protocol in one line, printed with every result."""
    return (
        f"protocol: {num_tasks} {split} tasks of {cfg.task.source} (seed {cfg.eval.seed}), episodes per inner step "
        f"{eval_episodes(cfg)}, inner steps {eval_steps(cfg)} (policy gradient, step sizes {eval_step_sizes(cfg)})"
    )


def evaluate_returns(
    group, cfg: Config, theta: np.ndarray, split: str, num_tasks: int, progress: TextIO | None = None
) -> list[EvalRow]:
    """The held-out tasks' returns after each of ``eval_steps``, one row per (episodes, steps), on
    ``group``'s workers (a ``MetaRLGroup``), ``CHUNK_TASKS`` tasks a call; ``progress``: where to
    report tasks done, rate and ETA."""
    steps, sizes, started = eval_steps(cfg), eval_step_sizes(cfg), time.time()
    # a call is allowed a training step's time per training step's worth of episodes (a step: its
    # meta-batch's, before and after one inner step): a frozen worker fails the call (a fault,
    # recovered from) instead of hanging the run
    step_episodes = 2 * cfg.train.meta_batch_size * cfg.rl.episodes_per_task
    chunks = [range(lo, min(lo + CHUNK_TASKS, num_tasks)) for lo in range(0, num_tasks, CHUNK_TASKS)]
    total = num_tasks * len(eval_episodes(cfg))
    rows = []
    for done, episodes in enumerate(eval_episodes(cfg)):
        returns = []
        for chunk in chunks:
            work = len(chunk) * (len(sizes) + 1) * episodes / step_episodes
            timeout_s = cfg.cluster.step_timeout_s * max(1.0, work)
            returns.append(group.evaluate(theta, split, chunk, cfg.eval.seed, sizes, episodes, timeout_s))
            if progress is not None:
                report_progress(progress, done * num_tasks + chunk.stop, total, started)
        returns = np.concatenate(returns)
        for k in steps:
            rows.append(
                scored_row(
                    returns[:, k],
                    int((~np.isfinite(returns[:, k])).sum()),
                    ways=0,
                    shots=episodes,
                    steps=k,
                    metric="return",
                )
            )
    return rows
