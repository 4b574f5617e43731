"""MuJoCo locomotion with the MAML paper's task distributions (Finn et al., 2017, §5.3), on
gymnasium's HalfCheetah-v5 and Ant-v5 through the ``mujoco`` wheel (no mujoco-py, no licence, no
download): ``pip install "distmeta[mujoco]"``. HalfCheetah's reward shaping is that of the reference
implementations (cbfinn/maml_rl on rllab, tristandeleu/pytorch-maml-rl), built from the v5
environments' own reward terms; Ant's is v5's own (a control cost of 0.5 |a|^2 and 1 a step while
healthy, where the references have 0.005 |a|^2 and 0.05; the same contact cost and healthy range),
and both observe v5's observations, not the references' (the cheetah lacks the centre of mass, the
ant the contact forces, orientation and centre of mass); 200 steps an episode.

  halfcheetah_direction  direction +1 or -1 (even odds): direction x forward velocity
                         - 0.05 |a|^2 (half of v5's control cost)
  halfcheetah_velocity   goal velocity U(0, 2): -|forward velocity - goal| - 0.05 |a|^2
  ant_direction          direction +1 or -1: direction x forward velocity - 0.5 |a|^2
                         - contact cost + 1 while healthy (v5's terms); episodes end when the
                         torso leaves [0.2, 1] in height, as in v5. Observations without the
                         contact forces (27 numbers)

gymnasium's v5 dynamics are not rllab's (MuJoCo 3 against 1.31, other model files), so the papers'
returns are a reference, not a target to the digit.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np

from distmeta.rl.envs.gymnasium_tasks import GymnasiumTasks

log = logging.getLogger(__name__)


def directions(rng: np.random.Generator, num_tasks: int) -> np.ndarray:
    """+1 or -1 along x, even odds, [num_tasks, 1]."""
    return 2.0 * rng.integers(0, 2, (num_tasks, 1)) - 1.0


def _model_warning(message: str) -> None:
    """MuJoCo's warnings while a model compiles. gymnasium's HalfCheetah file sets
    ``settotalmass``, which MuJoCo 3.17 and later deprecate (the model compiles the same): that
    one would print once for every copy a rollout makes, so it is dropped; others are logged."""
    if "settotalmass" not in message:
        log.warning("MuJoCo: %s", message)


class Locomotion(GymnasiumTasks):
    task_dim, discrete = 1, False
    extra = "mujoco"

    @classmethod
    def make(cls):
        import mujoco

        previous = mujoco.get_mju_user_warning()
        mujoco.set_mju_user_warning(_model_warning)
        try:
            return super().make()
        finally:
            mujoco.set_mju_user_warning(previous)

    def action(self, action):
        return np.clip(action, -1.0, 1.0)  # both robots' actuators take [-1, 1]


class HalfCheetahDirection(Locomotion):
    observation_dim, action_dim = 17, 6
    gymnasium_class = ("mujoco.half_cheetah_v5", "HalfCheetahEnv")

    @classmethod
    def sample_tasks(cls, rng: np.random.Generator, num_tasks: int) -> np.ndarray:
        return directions(rng, num_tasks)

    def reward(self, task: np.ndarray, reward: float, info: dict) -> float:
        return task[0] * info["x_velocity"] + 0.5 * info["reward_ctrl"]  # v5's reward_ctrl: -0.1 |a|^2


class HalfCheetahVelocity(Locomotion):
    observation_dim, action_dim = 17, 6
    gymnasium_class = ("mujoco.half_cheetah_v5", "HalfCheetahEnv")
    task_ranges = ((0.0, 2.0),)  # goal velocity

    def reward(self, task: np.ndarray, reward: float, info: dict) -> float:
        return -abs(info["x_velocity"] - task[0]) + 0.5 * info["reward_ctrl"]


class AntDirection(Locomotion):
    observation_dim, action_dim = 27, 8
    gymnasium_class = ("mujoco.ant_v5", "AntEnv")
    options: ClassVar[dict] = {"include_cfrc_ext_in_observation": False}

    @classmethod
    def sample_tasks(cls, rng: np.random.Generator, num_tasks: int) -> np.ndarray:
        return directions(rng, num_tasks)

    def reward(self, task: np.ndarray, reward: float, info: dict) -> float:
        return task[0] * info["x_velocity"] + info["reward_ctrl"] + info["reward_contact"] + info["reward_survive"]
