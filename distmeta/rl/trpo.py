"""The trust-region step (Schulman et al., 2015): minimise a surrogate loss subject to a mean KL
divergence between the old and the new policy of at most ``max_kl``. Conjugate gradient solves
F x = g with Fisher-vector products only (F is never formed), the step is scaled to the constraint's
boundary, and a backtracking line search keeps the first step that lowers the loss within it.

The step needs three things of the problem, ``TrustRegionProblem``; in one process they are one
object's methods, and a problem whose data is spread over workers answers them by summing the
workers' shares, which is what keeps one update per meta-step whatever the number of workers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class TrustRegionProblem(Protocol):
    def gradient(self) -> tuple[float, Tensor]:
        """The surrogate loss at the current parameters and its gradient (flat)."""

    def fisher_product(self, vector: Tensor) -> Tensor:
        """The KL divergence's Hessian at the current parameters times ``vector`` (flat)."""

    def evaluate(self, theta: Tensor) -> tuple[float, float]:
        """The surrogate loss and the mean KL divergence from the current policy at ``theta``."""


@dataclass(frozen=True)
class TrustRegionStep:
    theta: Tensor  # the parameters after the step (the old ones if no step was accepted)
    loss_before: float
    loss_after: float
    kl: float  # mean KL divergence of the accepted step (0 if none)
    backtracks: int  # halvings (by the backtrack ratio) before the accepted step
    accepted: bool


def conjugate_gradient(product: Callable[[Tensor], Tensor], b: Tensor, iterations: int, tolerance=1e-10) -> Tensor:
    """An approximate solution of A x = b for symmetric positive definite A, given only x -> A x."""
    x = torch.zeros_like(b)
    residual = b.clone()
    direction = b.clone()
    residual_norm = residual @ residual
    for _ in range(iterations):
        if residual_norm < tolerance:
            break
        a_direction = product(direction)
        alpha = residual_norm / (direction @ a_direction)
        x = x + alpha * direction
        residual = residual - alpha * a_direction
        new_norm = residual @ residual
        direction = residual + (new_norm / residual_norm) * direction
        residual_norm = new_norm
    return x


def trust_region_step(
    theta: Tensor,
    problem: TrustRegionProblem,
    max_kl: float,
    cg_iters: int,
    cg_damping: float,
    ls_max_steps: int,
    ls_backtrack_ratio: float,
) -> TrustRegionStep:
    """One TRPO step from ``theta`` on ``problem``."""
    loss, gradient = problem.gradient()
    product = lambda v: problem.fisher_product(v) + cg_damping * v  # noqa: E731
    direction = conjugate_gradient(product, gradient, cg_iters)
    curvature = float(direction @ product(direction))  # s^T F s: the full step's 2 x KL is max_kl's
    if not curvature > 0:  # a zero gradient, or a non-finite solve: no step is better than a wrong one
        return TrustRegionStep(theta, loss, loss, 0.0, 0, False)
    full_step = direction * (2 * max_kl / curvature) ** 0.5
    for backtracks in range(ls_max_steps):
        candidate = theta - ls_backtrack_ratio**backtracks * full_step
        new_loss, kl = problem.evaluate(candidate)
        if new_loss < loss and kl <= max_kl:
            return TrustRegionStep(candidate, loss, new_loss, kl, backtracks, True)
    return TrustRegionStep(theta, loss, loss, 0.0, ls_max_steps, False)
