"""ProMP (Rothfuss et al., 2019, "ProMP: Proximal Meta-Policy Search"), as its reference
implementation (jonasrothfuss/ProMP) and its configs run it.

The inner step descends the low variance curvature (LVC) surrogate: minus the mean of
pi(a|s) / pi_o(a|s) times the advantage, pi_o the policy that collected the episodes. At the
parameters that collected them its gradient is the policy gradient (so the adapted policies are
MAML's), and its second derivative, which the meta-gradient reaches through the inner step, is the
low-variance curvature estimate of the paper's section 5. The meta-objective is PPO's clipped
surrogate of the adapted policies on their own episodes plus a KL penalty between the pre-update
policies and those that collected the pre-update episodes; Adam takes ``ppo_steps`` steps on it
per batch of episodes, re-adapting from the current theta each time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distmeta.params import ParamLayout
from distmeta.rl.episodes import Episodes
from distmeta.rl.maml_trpo import AdaptationConfig, MamlTrpo, MetaRLBatch, Params
from distmeta.rl.policies import per_task
from distmeta.rl.trpo import MeanOverShares, MetaStep


@dataclass(frozen=True)
class ProMPConfig(AdaptationConfig):
    """The reference's settings (its point-mass and MuJoCo run scripts)."""

    learning_rate: float = 1e-3  # Adam on the meta-objective
    ppo_steps: int = 5  # Adam steps on each batch of episodes
    clip_eps: float = 0.3
    inner_kl_penalty: float = 5e-4  # fixed, as the reference's configs run it (adaptive_inner_kl_penalty: False)


class ProMP(MamlTrpo):
    config_class = ProMPConfig
    ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")

    def __init__(self, cfg: ProMPConfig, policy, env):
        super().__init__(cfg, policy, env)
        self.weights: Tensor | None = None  # theta as Adam holds it, with its moments
        self.optimizer: torch.optim.Adam | None = None

    def _start_optimizer(self, theta: Tensor) -> None:
        self.weights = theta.detach().clone().requires_grad_()
        self.optimizer = torch.optim.Adam([self.weights], lr=self.cfg.learning_rate)

    def optimizer_state(self) -> dict[str, Tensor]:
        """Adam's step count and moments (none before the first meta-step)."""
        if self.optimizer is None:
            return {}
        state = self.optimizer.state[self.weights]
        return {key: state[key].detach().clone() for key in self.ADAM_STATE}

    def load_optimizer_state(self, theta: Tensor, state: dict[str, Tensor]) -> None:
        """Continue from ``optimizer_state()``'s answer: the next step is the one it would have taken."""
        if not state:
            self.weights = self.optimizer = None
            return
        if sorted(state) != sorted(self.ADAM_STATE) or state["exp_avg"].shape != theta.shape:
            raise ValueError(f"not ProMP's Adam state for {theta.numel()} parameters: {sorted(state)}")
        self._start_optimizer(theta)
        self.optimizer.state[self.weights] = {key: state[key].detach().clone() for key in self.ADAM_STATE}

    def inner_loss(self, params: Params, episodes: Episodes) -> Tensor:
        """LVC, per task [T]: minus the mean over episodes and steps of pi(a|s) / pi_o(a|s) A."""
        ratio, _ = self.against_behaviour(params, episodes)
        return -episodes.step_mean(ratio * episodes.advantages)

    def objective(self, theta: Params, batch: MetaRLBatch, create_graph: bool) -> tuple[Tensor, Tensor]:
        """Per task [T]: the meta-objective (the clipped surrogate after the inner steps, plus the
        penalised mean KL of the pre-update policies from those that collected their episodes) and
        the adapted policies' mean KL from those that collected the later episodes."""
        params = per_task(theta, len(batch.tasks))
        inner_kls = []
        for episodes in batch.train:
            inner_kls.append(episodes.step_mean(self.against_behaviour(params, episodes)[1]))
            params = self.inner_step(params, episodes, create_graph)
        valid, eps = batch.valid, self.cfg.clip_eps
        ratio, kl = self.against_behaviour(params, valid)
        clipped = torch.minimum(ratio * valid.advantages, ratio.clamp(1 - eps, 1 + eps) * valid.advantages)
        penalty = self.cfg.inner_kl_penalty * torch.stack(inner_kls).mean(0)
        return -valid.step_mean(clipped) + penalty, valid.step_mean(kl)

    def share(self, layout: ParamLayout, theta: Tensor, batch: MetaRLBatch) -> ProMPShare:
        return ProMPShare(self, layout, batch)

    def meta_step(self, theta: Tensor, problem: MeanOverShares) -> MetaStep:
        """``ppo_steps`` Adam steps on the meta-batch's objective (its shares' means), from ``theta``."""
        if self.optimizer is None:
            self._start_optimizer(theta)
        with torch.no_grad():
            self.weights.copy_(theta)
        loss_before = None
        for _ in range(self.cfg.ppo_steps):
            loss, gradient = problem.mean("gradient_sum", self.weights.detach().clone())
            loss_before = loss if loss_before is None else loss_before
            self.weights.grad = gradient
            self.optimizer.step()
        loss_after, kl = problem.mean("evaluate_sum", self.weights.detach().clone())
        return MetaStep(self.weights.detach().clone(), loss_before, loss_after, kl)


class ProMPShare:
    """A batch's share of ProMP's problem: sums over its tasks of the objective and its gradient at
    any theta (each Adam step re-adapts from there), and of the objective and KL without gradients."""

    def __init__(self, learner: ProMP, layout: ParamLayout, batch: MetaRLBatch):
        self.learner, self.layout, self.batch = learner, layout, batch
        self.num_tasks = len(batch.tasks)

    def gradient_sum(self, theta: Tensor) -> tuple[float, Tensor]:
        with torch.enable_grad():
            flat = theta.detach().requires_grad_()
            loss, _ = self.learner.objective(self.layout.unflatten(flat), self.batch, not self.learner.cfg.first_order)
            gradient = torch.autograd.grad(loss.sum(), flat)[0]
        return float(loss.sum().detach()), gradient

    def evaluate_sum(self, theta: Tensor) -> tuple[float, float]:
        with torch.enable_grad():  # the inner step's gradient; nothing flows back to theta
            flat = theta.detach().requires_grad_()
            loss, kl = self.learner.objective(self.layout.unflatten(flat), self.batch, False)
        return float(loss.sum().detach()), float(kl.sum().detach())
