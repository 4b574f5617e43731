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

from distmeta.rl.envs.gymnasium_tasks import GymnasiumTasks


class CartPoleMass(GymnasiumTasks):
    observation_dim, action_dim, discrete, task_dim = 4, 2, True, 2
    gymnasium_class = ("classic_control.cartpole", "CartPoleEnv")
    task_ranges = ((0.5, 2.0), (0.05, 0.2))  # cart mass, pole mass

    @staticmethod
    def configure(env, task: np.ndarray) -> None:
        env.masscart, env.masspole = float(task[0]), float(task[1])
        env.total_mass = env.masspole + env.masscart  # derived in CartPoleEnv's constructor: kept in step
        env.polemass_length = env.masspole * env.length

    def action(self, action):
        return int(action)


class PendulumMass(GymnasiumTasks):
    observation_dim, action_dim, discrete, task_dim = 3, 1, False, 2
    gymnasium_class = ("classic_control.pendulum", "PendulumEnv")
    task_ranges = ((0.5, 2.0), (0.5, 2.0))  # mass, length

    @staticmethod
    def configure(env, task: np.ndarray) -> None:
        env.m, env.l = float(task[0]), float(task[1])

    def action(self, action):
        return np.asarray(action, dtype=np.float32)
