"""Tasks on gymnasium's own environments: T x E copies of one, stepped in a Python loop (a
classic-control step costs microseconds, a MuJoCo one tens of them). A task is a few numbers:
``configure(env, task)`` sets it on a copy (a mass, a length), or ``reward(task, reward, info)``
reshapes the environment's reward for it (a direction, a goal velocity). gymnasium, and MuJoCo for
the locomotion tasks, are optional extras, named in the error when missing.

Copies are kept between batches in this process (``_pool``): making a MuJoCo environment parses
its model, and a rollout of 40 tasks x 20 episodes would otherwise make 800 of them. Each episode
starts from ``env.reset(seed=...)`` with a seed from its task's generator, so a reused copy starts
exactly as a new one would.
"""

from __future__ import annotations

import importlib
from typing import ClassVar

import numpy as np

from distmeta.rl.envs.base import Environment


class GymnasiumTasks(Environment):
    """``gymnasium_class``: (module under ``gymnasium.envs``, class name); ``options``: its
    constructor's keyword arguments; ``extra``: the distmeta extra that installs what it needs. A
    task is one uniform draw in each of ``task_ranges`` unless ``sample_tasks`` says otherwise."""

    horizon = 200
    gymnasium_class: tuple[str, str]
    options: ClassVar[dict] = {}
    extra = "rl"
    task_ranges: tuple[tuple[float, float], ...] = ()
    _pool: ClassVar[dict[type, list]] = {}  # per process, shared by every subclass

    @classmethod
    def gymnasium(cls):
        module, name = cls.gymnasium_class
        try:
            return getattr(importlib.import_module(f"gymnasium.envs.{module}"), name)
        except Exception as err:  # ImportError, or gymnasium's DependencyNotInstalled for mujoco
            if isinstance(err, ImportError) or type(err).__name__ == "DependencyNotInstalled":
                raise ImportError(
                    f"this environment runs on gymnasium's {name}: pip install 'distmeta[{cls.extra}]' ({err})"
                ) from None
            raise

    @classmethod
    def make(cls):
        """A new copy of the environment."""
        return cls.gymnasium()(**cls.options)

    @classmethod
    def check_available(cls) -> None:
        cls.gymnasium()

    @classmethod
    def sample_tasks(cls, rng: np.random.Generator, num_tasks: int) -> np.ndarray:
        return np.stack([rng.uniform(low, high, num_tasks) for low, high in cls.task_ranges], 1)

    def __init__(self, tasks: np.ndarray, episodes: int, rngs: list[np.random.Generator]):
        super().__init__(tasks, episodes, rngs)
        pool = GymnasiumTasks._pool.setdefault(type(self), [])
        needed = len(self.tasks) * episodes
        pool.extend(self.make() for _ in range(needed - len(pool)))
        self.envs = [pool[t * episodes : (t + 1) * episodes] for t in range(len(self.tasks))]
        for row, task in zip(self.envs, self.tasks):
            for env in row:
                self.configure(env, task)

    @staticmethod
    def configure(env, task: np.ndarray) -> None:
        """Set ``task`` on a copy (by default nothing: the task shapes the reward alone)."""

    def reward(self, task: np.ndarray, reward: float, info: dict) -> float:
        """The task's reward for a step whose environment reward and info are these."""
        return reward

    def reset(self) -> np.ndarray:
        self.ended = np.zeros((len(self.tasks), self.episodes), dtype=bool)
        self.last = np.zeros((len(self.tasks), self.episodes, self.observation_dim))
        for t, (row, rng) in enumerate(zip(self.envs, self.rngs)):
            for e, (env, seed) in enumerate(zip(row, rng.integers(2**31, size=self.episodes))):
                self.last[t, e] = env.reset(seed=int(seed))[0]  # the start state from the task's generator
        return self.last.copy()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        reward = np.zeros(self.ended.shape)
        for t, (row, task) in enumerate(zip(self.envs, self.tasks)):
            for e, env in enumerate(row):
                if self.ended[t, e]:  # gymnasium's environments are not to be stepped past their end
                    continue
                observation, env_reward, terminated, _, info = env.step(self.action(actions[t, e]))
                reward[t, e] = self.reward(task, env_reward, info)
                self.last[t, e], self.ended[t, e] = observation, terminated
        return self.last.copy(), reward, self.ended.copy()

    def action(self, action):
        return action
