"""MAML for reinforcement learning (Finn et al., 2017, §5.3) with a TRPO meta-step, as in the
paper and tristandeleu/pytorch-maml-rl.

For each task: episodes of the policy at theta, an inner step of vanilla policy gradient on them
(REINFORCE with GAE against a per-task linear feature baseline), episodes of the adapted policy.
The meta-objective is the TRPO surrogate of the adapted policies on those later episodes,
differentiated through the inner step (second order; ``first_order`` treats the inner gradient as a
constant), and theta takes one trust-region step on it. The line search re-adapts every candidate
theta on the episodes already collected, so the step needs the episodes, not new rollouts.

``MetaRLBatch`` is what one process keeps of its tasks between the rollouts and the step;
``MamlTrpoShare`` turns it into the sums over its tasks that the trust-region step asks for
(trpo.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import kl_divergence

from distmeta.params import ParamLayout
from distmeta.rl.envs.base import Environment
from distmeta.rl.episodes import Episodes, rollout, with_advantages
from distmeta.rl.policies import action_distribution, per_task
from distmeta.rl.trpo import MeanOverShares, MetaStep, trust_region_step

Params = dict[str, Tensor]


@dataclass(frozen=True)
class AdaptationConfig:
    """What MAML-TRPO and ProMP share: the episodes, the advantages and the inner steps."""

    gamma: float = 0.99
    gae_lambda: float = 1.0
    inner_lr: float = 0.1
    inner_steps: int = 1
    first_order: bool = False
    episodes_per_task: int = 20


@dataclass(frozen=True)
class MamlTrpoConfig(AdaptationConfig):
    """The MAML paper's 2-D navigation settings (its appendix, and pytorch-maml-rl's config)."""

    max_kl: float = 1e-2
    cg_iters: int = 10
    cg_damping: float = 1e-5
    ls_max_steps: int = 15
    ls_backtrack_ratio: float = 0.8


@dataclass(frozen=True)
class MetaRLBatch:
    """A batch of tasks' episodes: ``train[k]`` collected before inner step k, ``valid`` by the adapted
    policies, each with advantages (and the output of the policy that collected them: the
    surrogate's denominator)."""

    tasks: np.ndarray
    train: list[Episodes]
    valid: Episodes


class MamlTrpo:
    config_class = MamlTrpoConfig

    def __init__(self, cfg: MamlTrpoConfig, policy: nn.Module, env: type[Environment]):
        self.cfg, self.policy, self.env = cfg, policy, env

    def share(self, layout: ParamLayout, theta: Tensor, batch: MetaRLBatch) -> MamlTrpoShare:
        """The batch's share of the meta-step's problem at ``theta``."""
        return MamlTrpoShare(self, layout, theta, batch)

    def optimizer_state(self) -> dict[str, Tensor]:
        """What the meta-step keeps between steps besides theta, for checkpoints: TRPO keeps nothing."""
        return {}

    def load_optimizer_state(self, theta: Tensor, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"a TRPO meta-step keeps no state, but was given {sorted(state)}")

    def meta_step(self, theta: Tensor, problem: MeanOverShares) -> MetaStep:
        """theta after one TRPO step on the meta-batch's ``problem`` (its shares' means)."""
        cfg = self.cfg
        return trust_region_step(
            theta, problem, cfg.max_kl, cfg.cg_iters, cfg.cg_damping, cfg.ls_max_steps, cfg.ls_backtrack_ratio
        )

    def inner_loss(self, params: Params, episodes: Episodes) -> Tensor:
        """REINFORCE with advantages, per task [T]: minus the mean over episodes and steps of
        log pi(a | s) A."""
        log_prob = action_distribution(self.policy, params, episodes.observations).log_prob(episodes.actions)
        return -episodes.step_mean(log_prob * episodes.advantages)

    def against_behaviour(self, params: Params, episodes: Episodes) -> tuple[Tensor, Tensor]:
        """Per step [T, H, E]: each task's policy (params) against the one that collected its
        episodes, pi_o: the importance ratio pi(a | s) / pi_o(a | s) and KL(pi_o || pi)."""
        new = action_distribution(self.policy, params, episodes.observations)
        old = self.policy.distribution(episodes.behaviour)
        return torch.exp(new.log_prob(episodes.actions) - old.log_prob(episodes.actions)), kl_divergence(old, new)

    def inner_step(self, params: Params, episodes: Episodes, create_graph: bool, lr: float | None = None) -> Params:
        """One policy-gradient step of every task's parameters [T, ...] on its episodes (step size
        ``inner_lr`` unless ``lr``)."""
        loss = self.inner_loss(params, episodes).sum()  # tasks are independent: each gets its own gradient
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        lr = self.cfg.inner_lr if lr is None else lr
        return {n: p - lr * g for (n, p), g in zip(params.items(), grads)}

    def detached_step(self, params: Params, episodes: Episodes, lr: float | None = None) -> Params:
        """``inner_step`` with nothing to differentiate: rollouts and evaluation."""
        with torch.enable_grad():
            params = self.inner_step({n: p.detach().requires_grad_() for n, p in params.items()}, episodes, False, lr)
        return {n: p.detach() for n, p in params.items()}

    def adapt(self, theta: Params, train: list[Episodes], create_graph: bool) -> Params:
        """Each task's parameters after the inner steps on its ``train`` episodes, [T, ...]."""
        params = per_task(theta, len(train[0].rewards))
        for episodes in train:
            params = self.inner_step(params, episodes, create_graph)
        return params

    def collect(self, theta: Params, tasks: np.ndarray, rngs: list[np.random.Generator]) -> MetaRLBatch:
        """Roll out, adapt and roll out again for every task (task t's randomness from ``rngs[t]``):
        the data of one meta-step."""
        cfg = self.cfg
        params = per_task(theta, len(tasks))
        train = []
        for _ in range(cfg.inner_steps):
            episodes = rollout(self.policy, params, self.env, tasks, cfg.episodes_per_task, rngs)
            train.append(with_advantages(episodes, cfg.gamma, cfg.gae_lambda))
            params = self.detached_step(params, train[-1])
        valid = rollout(self.policy, params, self.env, tasks, cfg.episodes_per_task, rngs)
        valid = with_advantages(valid, cfg.gamma, cfg.gae_lambda)
        return MetaRLBatch(tasks, train, valid)

    def surrogate(self, theta: Params, batch: MetaRLBatch, create_graph: bool) -> tuple[Tensor, Tensor]:
        """Per task [T]: the TRPO surrogate loss of the policy adapted from ``theta`` on the batch's
        later episodes (minus the importance-weighted advantage) and the mean KL divergence from
        the policy that collected them, KL(old || new)."""
        ratio, kl = self.against_behaviour(self.adapt(theta, batch.train, create_graph), batch.valid)
        return -batch.valid.step_mean(ratio * batch.valid.advantages), batch.valid.step_mean(kl)


class MamlTrpoShare:
    """A batch's share of the trust-region problem at ``theta`` (flat): sums over its tasks
    (``ProblemShare``). Before the step the surrogate's value is the mean advantage (0 with
    normalised advantages); what matters is its gradient, through the inner step."""

    def __init__(self, learner: MamlTrpo, layout: ParamLayout, theta: Tensor, batch: MetaRLBatch):
        self.learner, self.layout, self.batch = learner, layout, batch
        self.num_tasks = len(batch.tasks)
        self.theta = theta.detach().requires_grad_()
        with torch.enable_grad():
            loss, kl = learner.surrogate(self.named(self.theta), batch, create_graph=not learner.cfg.first_order)
            self.loss = loss.sum()
            self.loss_gradient = torch.autograd.grad(self.loss, self.theta, retain_graph=True)[0]
            self.kl_gradient = torch.autograd.grad(kl.sum(), self.theta, create_graph=True)[0]

    def named(self, flat: Tensor) -> Params:
        return self.layout.unflatten(flat)

    def gradient_sum(self) -> tuple[float, Tensor]:
        return float(self.loss.detach()), self.loss_gradient.detach()

    def fisher_product_sum(self, vector: Tensor) -> Tensor:
        with torch.enable_grad():
            return torch.autograd.grad(self.kl_gradient @ vector, self.theta, retain_graph=True)[0]

    def evaluate_sum(self, theta: Tensor) -> tuple[float, float]:
        with torch.enable_grad():  # the inner step's gradient; nothing flows back to theta
            loss, kl = self.learner.surrogate(self.named(theta.detach().requires_grad_()), self.batch, False)
        return float(loss.sum().detach()), float(kl.sum().detach())
