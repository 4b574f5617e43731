"""Classic control with random dynamics, on gymnasium's own environments (RLlib's CartPoleMass and
PendulumMass meta-environments): a task sets the physical constants of every copy of its
environment, and the copies step in a Python loop (a classic-control step costs microseconds).
gymnasium is an optional extra: ``pip install "distmeta[rl]"``.

  cartpole_mass   CartPole-v1's dynamics, cart mass U(0.5, 2.0), pole mass U(0.05, 0.2) (RLlib's
                  ranges); reward 1 a step until the pole falls or the cart leaves the track.
  pendulum_mass   Pendulum-v1's dynamics, mass U(0.5, 2.0) (RLlib's range) and length U(0.5, 2.0)
                  (ours: RLlib varies the mass alone); reward minus the swing-up cost.

Both run 200 steps an episode (Pendulum-v1's limit; CartPole-v1's is 500).
"""

from __future__ import annotations

import numpy as np

from distmeta.rl.envs.base import Environment


def _gymnasium_class(module: str, name: str):
    try:
        import importlib

        return getattr(importlib.import_module(f"gymnasium.envs.classic_control.{module}"), name)
    except ImportError as err:
        raise ImportError(f"this environment runs on gymnasium: pip install 'distmeta[rl]' ({err})") from None


class GymnasiumTasks(Environment):
    """T x E copies of the gymnasium environment ``gymnasium_class`` (module, class name in
    classic_control); a task is one uniform draw in each of ``task_ranges``, and
    ``configure(env, task)`` sets it on a copy."""

    horizon = 200
    gymnasium_class: tuple[str, str]
    task_ranges: tuple[tuple[float, float], ...]

    @classmethod
    def check_available(cls) -> None:
        _gymnasium_class(*cls.gymnasium_class)

    @classmethod
    def sample_tasks(cls, rng: np.random.Generator, num_tasks: int) -> np.ndarray:
        return np.stack([rng.uniform(low, high, num_tasks) for low, high in cls.task_ranges], 1)

    def __init__(self, tasks: np.ndarray, episodes: int, rngs: list[np.random.Generator]):
        super().__init__(tasks, episodes, rngs)
        self.envs = [[self.make() for _ in range(episodes)] for _ in self.tasks]
        for row, task in zip(self.envs, self.tasks):
            for env in row:
                self.configure(env, task)

    def make(self):
        return _gymnasium_class(*self.gymnasium_class)()

    def configure(self, env, task: np.ndarray) -> None:
        raise NotImplementedError

    def reset(self) -> np.ndarray:
        self.ended = np.zeros((len(self.tasks), self.episodes), dtype=bool)
        self.last = np.zeros((len(self.tasks), self.episodes, self.observation_dim))
        for t, (row, rng) in enumerate(zip(self.envs, self.rngs)):
            for e, (env, seed) in enumerate(zip(row, rng.integers(2**31, size=self.episodes))):
                self.last[t, e] = env.reset(seed=int(seed))[0]  # the start state from the task's generator
        return self.last.copy()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        reward = np.zeros(self.ended.shape)
        for t, row in enumerate(self.envs):
            for e, env in enumerate(row):
                if self.ended[t, e]:  # gymnasium's environments are not to be stepped past their end
                    continue
                observation, reward[t, e], terminated, _, _ = env.step(self.action(actions[t, e]))
                self.last[t, e], self.ended[t, e] = observation, terminated
        return self.last.copy(), reward, self.ended.copy()

    def action(self, action):
        return action


class CartPoleMass(GymnasiumTasks):
    observation_dim, action_dim, discrete, task_dim = 4, 2, True, 2
    gymnasium_class = ("cartpole", "CartPoleEnv")
    task_ranges = ((0.5, 2.0), (0.05, 0.2))  # cart mass, pole mass

    def configure(self, env, task: np.ndarray) -> None:
        env.masscart, env.masspole = float(task[0]), float(task[1])
        env.total_mass = env.masspole + env.masscart  # derived in CartPoleEnv's constructor: kept in step
        env.polemass_length = env.masspole * env.length

    def action(self, action):
        return int(action)


class PendulumMass(GymnasiumTasks):
    observation_dim, action_dim, discrete, task_dim = 3, 1, False, 2
    gymnasium_class = ("pendulum", "PendulumEnv")
    task_ranges = ((0.5, 2.0), (0.5, 2.0))  # mass, length

    def configure(self, env, task: np.ndarray) -> None:
        env.m, env.l = float(task[0]), float(task[1])

    def action(self, action):
        return np.asarray(action, dtype=np.float32)
