"""Random tabular MDPs (Duan et al., 2016, RL^2; pytorch-maml-rl's TabularMDP): a task is a
transition table P[s, a, s'] with rows drawn from Dirichlet(1) and mean rewards R[s, a] from
N(1, 1); the reward is its mean (deterministic), the start state is 0, the observation is the
state one-hot. Small enough that a policy's expected return has a closed form (dynamic
programming over state distributions), which is what the policy-gradient tests check against."""

from __future__ import annotations

import numpy as np

from distmeta.rl.envs.base import Environment, draw_categorical


class TabularMDP(Environment):
    num_states, num_actions = 5, 3
    observation_dim, action_dim = 5, 3
    discrete = True
    horizon = 10
    task_dim = 5 * 3 * 5 + 5 * 3

    @classmethod
    def sized(cls, num_states: int, num_actions: int, horizon: int) -> type[TabularMDP]:
        """The same family with other sizes."""
        dims = {
            "num_states": num_states,
            "num_actions": num_actions,
            "observation_dim": num_states,
            "action_dim": num_actions,
            "horizon": horizon,
            "task_dim": num_states * num_actions * (num_states + 1),
        }
        return type(f"TabularMDP{num_states}x{num_actions}", (cls,), dims)

    @classmethod
    def sample_tasks(cls, rng: np.random.Generator, num_tasks: int) -> np.ndarray:
        s, a = cls.num_states, cls.num_actions
        transitions = rng.dirichlet(np.ones(s), size=(num_tasks, s, a))
        rewards = rng.normal(1.0, 1.0, size=(num_tasks, s, a))
        return np.concatenate([transitions.reshape(num_tasks, -1), rewards.reshape(num_tasks, -1)], 1)

    @classmethod
    def tables(cls, tasks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A batch of tasks as their tables: P [T, S, A, S] and R [T, S, A]."""
        s, a = cls.num_states, cls.num_actions
        split = s * a * s
        return tasks[:, :split].reshape(-1, s, a, s), tasks[:, split:].reshape(-1, s, a)

    def reset(self) -> np.ndarray:
        self.transitions, self.rewards = self.tables(self.tasks)
        self.state = np.zeros((len(self.tasks), self.episodes), dtype=np.int64)
        return self._observe()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        task = np.arange(len(self.tasks))[:, None]
        reward = self.rewards[task, self.state, actions]
        self.state = draw_categorical(self.transitions[task, self.state, actions], self.rngs)
        return self._observe(), reward, np.zeros(self.state.shape, dtype=bool)

    def _observe(self) -> np.ndarray:
        return np.eye(self.num_states)[self.state]
