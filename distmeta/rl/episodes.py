"""Episodes of many tasks at once, and what policy gradients need of them: rollouts, discounted
returns, the linear feature baseline and advantages.

Every array has the task axis first and time second, [T, H, E, ...] (tasks, steps, episodes per
task), so per-task parameters line up with ``vmap`` over the first axis. ``mask`` is 1 on the steps
an episode ran (its last included) and 0 after it ended; everything after is zero."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn

from distmeta.rl.envs.base import Environment
from distmeta.rl.policies import policy_output

BASELINE_REGULARISATION = 1e-5  # raised tenfold, up to five times, while the normal equations are singular


@dataclass(frozen=True)
class Episodes:
    observations: Tensor  # [T, H, E, observation_dim]
    actions: Tensor  # [T, H, E, action_dim], or [T, H, E] integers for discrete actions
    rewards: Tensor  # [T, H, E], zero after an episode ends
    mask: Tensor  # [T, H, E]
    behaviour: Tensor  # [T, H, E, width]: the output of the policy that chose the actions (importance ratios, KL)
    advantages: Tensor | None = None  # [T, H, E], set by ``with_advantages``

    @property
    def lengths(self) -> Tensor:
        """Steps each episode ran, [T, E]."""
        return self.mask.sum(1)

    def returns(self) -> Tensor:
        """Each episode's undiscounted return, [T, E]."""
        return self.rewards.sum(1)

    def step_mean(self, values: Tensor) -> Tensor:
        """Per task, the mean over every step its episodes ran: [T, H, E] -> [T]. Policy-gradient
        losses are such means, as in the MAML and ProMP papers' code (``tf.reduce_mean`` over a task's
        samples), so an inner step size means what it means there. Where episodes end early this is
        not the mean of per-episode means (tristandeleu/pytorch-maml-rl's), which gives a short
        episode's steps the weight of a long one's and made 2-D navigation's inner step unstable
        (docs/meta_rl.md, "What closed the gap")."""
        return (values * self.mask).sum((1, 2)) / self.mask.sum((1, 2))


def rollout(
    policy: nn.Module,
    params: dict[str, Tensor],
    env: type[Environment],
    tasks: np.ndarray,
    episodes: int,
    rngs: list[np.random.Generator],
) -> Episodes:
    """``episodes`` episodes of each task's policy (params [T, ...]) in its task, without gradients,
    in the parameters' dtype and on their device; task t's randomness from ``rngs[t]``."""
    params = {n: p.detach() for n, p in params.items()}
    some = next(iter(params.values()))
    # A child of each task's generator: the loop stops once every episode of the batch has ended, so
    # how much it draws depends on the other tasks, and must not shift what the task draws next.
    rngs = [rng.spawn(1)[0] for rng in rngs]
    batch = env(tasks, episodes, rngs)
    observation = batch.reset()
    alive = np.ones((len(tasks), episodes), dtype=bool)
    steps: dict[str, list] = {"observations": [], "actions": [], "rewards": [], "mask": []}
    behaviour = []
    for _ in range(env.horizon):
        observed = torch.as_tensor(observation, dtype=some.dtype, device=some.device)
        with torch.no_grad():
            behaviour.append(policy_output(policy, params, observed))
        action = policy.sample(behaviour[-1], rngs)
        next_observation, reward, done = batch.step(policy.to_environment(action))
        for name, value in zip(steps, (observation, action, reward * alive, alive.astype(np.float64))):
            steps[name].append(value)
        alive = alive & ~done
        observation = next_observation
        if not alive.any():
            break
    stacked = {n: np.stack(v, 1) for n, v in steps.items()}
    floats = {n: torch.as_tensor(v, dtype=some.dtype, device=some.device) for n, v in stacked.items()}
    if env.discrete:
        floats["actions"] = torch.as_tensor(stacked["actions"], device=some.device)
    return Episodes(**floats, behaviour=torch.stack(behaviour, 1))


def discounted_returns(episodes: Episodes, gamma: float) -> Tensor:
    """Rewards to go, sum over k >= 0 of gamma^k r_{t+k}: [T, H, E]."""
    returns = torch.zeros_like(episodes.rewards)
    later = torch.zeros_like(episodes.rewards[:, 0])
    for t in reversed(range(episodes.rewards.shape[1])):
        later = episodes.rewards[:, t] + gamma * later
        returns[:, t] = later
    return returns


def baseline_features(episodes: Episodes) -> Tensor:
    """The linear feature baseline's features (Duan et al., 2016, supplement): observation, its
    square, time / 100 to the powers 1-3, and a constant, zero after an episode ends: [T, H, E, F]."""
    mask = episodes.mask.unsqueeze(-1)
    obs = episodes.observations
    steps = torch.arange(obs.shape[1], dtype=obs.dtype, device=obs.device).view(1, -1, 1, 1) / 100
    time = steps.expand(*obs.shape[:-1], 1)
    return torch.cat([obs, obs**2, time, time**2, time**3, torch.ones_like(time)], -1) * mask


def linear_baseline(episodes: Episodes, returns: Tensor) -> Tensor:
    """Each task's value estimates [T, H, E]: least squares of ``returns`` on its own episodes'
    features, with a ridge that grows, for that task alone, while its normal equations stay
    singular. A task whose episodes diverged (a policy with non-finite or overflowing parameters:
    features, returns or their products not finite) gets NaN estimates, so its terms come out
    non-finite (a training step is then rejected by the server), and the other tasks are fitted as
    ever."""
    features = baseline_features(episodes)
    design = features.flatten(1, 2)  # [T, H * E, F]
    targets = returns.flatten(1, 2).unsqueeze(-1)  # [T, H * E, 1]
    gram, moment = design.transpose(1, 2) @ design, design.transpose(1, 2) @ targets
    fitted = torch.isfinite(gram).flatten(1).all(1) & torch.isfinite(moment).flatten(1).all(1)  # [T]
    gram = torch.where(fitted.view(-1, 1, 1), gram, 0.0)
    moment = torch.where(fitted.view(-1, 1, 1), moment, 0.0)
    identity = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    ridge = torch.full((len(gram), 1, 1), BASELINE_REGULARISATION, dtype=gram.dtype, device=gram.device)
    for _ in range(5):
        weights, info = torch.linalg.solve_ex(gram + ridge * identity, moment)
        solved = (info == 0) & torch.isfinite(weights).flatten(1).all(1)
        if solved.all():
            values = (features @ weights.unsqueeze(1)).squeeze(-1)
            return torch.where(fitted.view(-1, 1, 1), values, math.nan)
        ridge = torch.where(solved.view(-1, 1, 1), ridge, 10 * ridge)
    raise FloatingPointError(f"the linear baseline's normal equations stay singular at a ridge of {ridge.max():g}")


def with_advantages(episodes: Episodes, gamma: float, gae_lambda: float, normalize: bool = True) -> Episodes:
    """The episodes with generalised advantage estimates (Schulman et al., 2016) against the linear
    baseline fitted to these episodes, normalised per task to mean 0 and standard deviation 1 over
    the steps that ran (as the reference implementations do)."""
    returns = discounted_returns(episodes, gamma)
    values = linear_baseline(episodes, returns)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)
    deltas = (episodes.rewards + gamma * next_values - values) * episodes.mask
    advantages = torch.zeros_like(deltas)
    later = torch.zeros_like(deltas[:, 0])
    for t in reversed(range(deltas.shape[1])):
        later = deltas[:, t] + gamma * gae_lambda * later
        advantages[:, t] = later
    if normalize:
        count = episodes.mask.sum((1, 2), keepdim=True)
        mean = advantages.sum((1, 2), keepdim=True) / count
        std = (((advantages - mean) * episodes.mask) ** 2).sum((1, 2), keepdim=True).div(count).sqrt()
        advantages = (advantages - mean) / (std + 1e-8) * episodes.mask
    return replace(episodes, advantages=advantages)
