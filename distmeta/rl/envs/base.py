"""What an environment is to distmeta: a distribution of tasks, and a batch of episodes of many
tasks at once. Tasks are numbers (a goal, masses), so the task generator draws them from
``(seed, draw)`` like any other task, they checkpoint with its cursor, and a run is reproducible.

An environment class is made for one batch: ``tasks`` [T, task_dim] and ``episodes`` per task;
``reset`` and ``step`` work on arrays [T, E, ...] (numpy, float64). Episodes that end (``done``)
stop counting: rollouts mask what follows, so an environment may keep stepping them. Each task has
its own random generator (``rngs``), so a task's episodes are the same whichever worker runs it and
with whichever other tasks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Environment(ABC):
    observation_dim: int
    action_dim: int  # a continuous action's width; for discrete actions, how many there are
    discrete: bool
    horizon: int  # steps in an episode unless it ends sooner
    task_dim: int

    def __init__(self, tasks: np.ndarray, episodes: int, rngs: list[np.random.Generator]):
        tasks = np.asarray(tasks, dtype=np.float64)
        if tasks.ndim != 2 or tasks.shape[1] != self.task_dim:
            raise ValueError(f"{type(self).__name__} takes tasks of shape [T, {self.task_dim}], got {tasks.shape}")
        if len(rngs) != len(tasks):
            raise ValueError(f"{len(tasks)} tasks need as many random generators, got {len(rngs)}")
        self.tasks, self.episodes, self.rngs = tasks, episodes, rngs

    @classmethod
    def check_available(cls) -> None:
        """Raise an ``ImportError`` naming the fix if what the environment runs on is not installed."""
        return None  # numpy alone

    @classmethod
    @abstractmethod
    def sample_tasks(cls, rng: np.random.Generator, num_tasks: int) -> np.ndarray:
        """``num_tasks`` tasks of the distribution, [num_tasks, task_dim]."""

    @abstractmethod
    def reset(self) -> np.ndarray:
        """The first observations, [T, E, observation_dim]."""

    @abstractmethod
    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Apply ``actions`` ([T, E, action_dim], or [T, E] integers): observations, rewards [T, E]
        and whether each episode ended on this step [T, E]."""


def per_task_draws(rngs: list[np.random.Generator], draw: str, shape: tuple[int, ...]) -> np.ndarray:
    """Task t's ``rngs[t].<draw>(shape)`` for every task, stacked: [T, *shape]."""
    return np.stack([getattr(rng, draw)(shape) for rng in rngs])


def draw_categorical(probabilities: np.ndarray, rngs: list[np.random.Generator]) -> np.ndarray:
    """One index per row of ``probabilities`` [T, ..., K] (task t's rows from ``rngs[t]``), by inverse CDF."""
    uniform = per_task_draws(rngs, "random", (*probabilities.shape[1:-1], 1))
    return np.minimum((uniform > probabilities.cumsum(-1)).sum(-1), probabilities.shape[-1] - 1)
