"""Policies: an MLP from observations to an action distribution, a Gaussian with a learned
state-independent log standard deviation for continuous actions (as in the MAML paper and its
reference implementations) or a categorical for discrete ones. Actions are drawn with numpy from
each task's own generator, so a rollout is a pure function of its seeds on any device. Like the supervised models, a
policy is run with ``torch.func.functional_call`` on a dict of parameters with a leading task axis
([T, ...]), so every task can hold its own adapted copy."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, Independent, Normal
from torch.func import functional_call, vmap

from distmeta.rl.envs.base import draw_categorical, per_task_draws

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def mlp(inputs: int, hidden: tuple[int, ...], outputs: int, activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(inputs, width), ACTIVATIONS[activation]()]
        inputs = width
    return nn.Sequential(*layers, nn.Linear(inputs, outputs))


class GaussianMLPPolicy(nn.Module):
    """N(mean(s), diag(exp(log_std))^2): the output is the mean and log_std side by side. Its
    actions are ``action_scale`` times the environment's: ProMP's reference rescales its policies'
    actions from [-10, 10] to the actuators' [-1, 1] (``normalize``'s ``normalization_scale``), so
    there the initial standard deviation of 1 is a tenth of the actuators' range, not all of it."""

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        hidden: tuple[int, ...],
        activation: str,
        init_std: float = 1.0,
        action_scale: float = 1.0,
    ):
        super().__init__()
        self.mean = mlp(observation_dim, hidden, action_dim, activation)
        self.log_std = nn.Parameter(torch.full((action_dim,), math.log(init_std)))
        self.action_scale = action_scale

    def to_environment(self, actions: np.ndarray) -> np.ndarray:
        """What the environment is given for the policy's ``actions`` (which the episodes record)."""
        return actions / self.action_scale

    def forward(self, observations: Tensor) -> Tensor:
        mean = self.mean(observations)
        return torch.cat([mean, self.log_std.expand_as(mean)], -1)

    @staticmethod
    def distribution(output: Tensor) -> Distribution:
        mean, log_std = output.chunk(2, -1)
        return Independent(Normal(mean, log_std.exp(), validate_args=False), 1, validate_args=False)

    @staticmethod
    def sample(output: Tensor, rngs: list[np.random.Generator]) -> np.ndarray:
        mean, log_std = np.split(output.detach().cpu().double().numpy(), 2, -1)
        return mean + np.exp(log_std) * per_task_draws(rngs, "standard_normal", mean.shape[1:])


class CategoricalMLPPolicy(nn.Module):
    """A softmax over the MLP's outputs. With no hidden layers on one-hot states it is a table."""

    def __init__(self, observation_dim: int, num_actions: int, hidden: tuple[int, ...], activation: str):
        super().__init__()
        self.logits = mlp(observation_dim, hidden, num_actions, activation)

    def forward(self, observations: Tensor) -> Tensor:
        return self.logits(observations)

    @staticmethod
    def distribution(output: Tensor) -> Distribution:
        return Categorical(logits=output, validate_args=False)

    @staticmethod
    def sample(output: Tensor, rngs: list[np.random.Generator]) -> np.ndarray:
        return draw_categorical(torch.softmax(output.detach().cpu().double(), -1).numpy(), rngs)

    @staticmethod
    def to_environment(actions: np.ndarray) -> np.ndarray:
        return actions


def build_policy(env, hidden: tuple[int, ...], activation: str, action_scale: float = 1.0) -> nn.Module:
    """The policy for environment class ``env``: categorical for discrete actions, else Gaussian."""
    if env.discrete:
        return CategoricalMLPPolicy(env.observation_dim, env.action_dim, hidden, activation)
    return GaussianMLPPolicy(env.observation_dim, env.action_dim, hidden, activation, action_scale=action_scale)


def policy_output(policy: nn.Module, params: dict[str, Tensor], observations: Tensor) -> Tensor:
    """Each task's policy on its observations: params [T, ...], observations [T, ...] -> the
    policy's output (what ``distribution`` and ``sample`` take), [T, ..., width]."""
    call = lambda p, x: functional_call(policy, p, (x,))  # noqa: E731
    return vmap(call)(params, observations)


def action_distribution(policy: nn.Module, params: dict[str, Tensor], observations: Tensor) -> Distribution:
    """Each task's action distribution on its observations, batch shape observations.shape[:-1]."""
    return policy.distribution(policy_output(policy, params, observations))


def per_task(theta: dict[str, Tensor], num_tasks: int) -> dict[str, Tensor]:
    """Each task's view of the shared parameters (no copy)."""
    return {name: p.expand(num_tasks, *p.shape) for name, p in theta.items()}
