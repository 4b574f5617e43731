"""2-D navigation, the MAML paper's point robot (Finn et al., 2017, §5.3), as the paper's code runs
it (cbfinn/maml_rl: ``normalize(PointEnvRandGoal())``): the agent starts at the origin; a task is a
goal drawn uniformly from [-0.5, 0.5]^2 (the unit square, centred on the start); an action is a
velocity in units of the top speed of 0.1, clipped to [-1, 1] per coordinate (rllab's ``normalize``
wrapper; tristandeleu/pytorch-maml-rl clips the raw velocity to [-0.1, 0.1] instead, which leaves
a policy's noise ten times wider against the speed and lands far from the paper's returns, docs/meta_rl.md);
the reward is the negative Euclidean distance to the goal after the move (the code's variant: the
paper's text says squared distance); an episode ends after 100 steps or once both coordinates are
within 0.01 of the goal. Vectorised in numpy over every task's episodes at once: no simulator."""

from __future__ import annotations

import numpy as np

from distmeta.rl.envs.base import Environment


class Navigation2D(Environment):
    observation_dim = 2
    action_dim = 2
    discrete = False
    horizon = 100
    task_dim = 2
    goal_low, goal_high = -0.5, 0.5
    max_speed = 0.1
    tolerance = 0.01

    @classmethod
    def sample_tasks(cls, rng: np.random.Generator, num_tasks: int) -> np.ndarray:
        return rng.uniform(cls.goal_low, cls.goal_high, size=(num_tasks, 2))

    def reset(self) -> np.ndarray:
        self.position = np.zeros((len(self.tasks), self.episodes, 2))
        return self.position.copy()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.position = self.position + np.clip(actions, -1.0, 1.0) * self.max_speed
        offset = self.position - self.tasks[:, None, :]
        reward = -np.sqrt((offset**2).sum(-1))
        done = (np.abs(offset) < self.tolerance).all(-1)
        return self.position.copy(), reward, done
