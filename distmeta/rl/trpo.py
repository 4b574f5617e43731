"""The trust-region step (Schulman et al., 2015): minimise a surrogate loss subject to a mean KL
divergence between the old and the new policy of at most ``max_kl``. Conjugate gradient solves
F x = g with Fisher-vector products only (F is never formed), the step is scaled to the constraint's
boundary, and a backtracking line search keeps the first step that lowers the loss within it.

The step needs three things of the problem, ``TrustRegionProblem``. A meta-batch's problem is split
into shares of its tasks (``ProblemShare``: a worker's, on the runtime) that answer with sums over
their tasks; ``MeanOverShares`` adds the shares' answers in order and divides by the number of
tasks, so there is one update per meta-step, the same whatever the number of shares."""

from __future__ import annotations

import functools
import math
import operator
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


class ProblemShare(Protocol):
    num_tasks: int

    def gradient_sum(self) -> tuple[float, Tensor]:
        """The sums over this share's tasks of the surrogate loss and of its gradient."""

    def fisher_product_sum(self, vector: Tensor) -> Tensor:
        """The sum over this share's tasks of their KL Hessian times ``vector``."""

    def evaluate_sum(self, theta: Tensor) -> tuple[float, float]:
        """The sums over this share's tasks of the surrogate loss and the KL divergence at ``theta``."""


class MeanOverShares:
    """A meta-batch's problem made of shares (a ``TrustRegionProblem`` when they are
    ``ProblemShare``s): every answer is the shares' sums, added in share order, over the number of
    tasks. ``gather(method, *args)`` calls ``method`` on every share and returns the answers in
    share order (``local``: in this process; the runtime: actor calls)."""

    def __init__(self, gather: Callable[..., list], num_tasks: int):
        self.gather, self.num_tasks = gather, num_tasks

    @classmethod
    def local(cls, shares: list) -> MeanOverShares:
        return cls(lambda method, *args: [getattr(s, method)(*args) for s in shares], sum(s.num_tasks for s in shares))

    def mean(self, method: str, *args):
        """The mean over tasks of the shares' answers to ``method`` (a sum, or a tuple of sums)."""
        answers = self.gather(method, *args)
        if not isinstance(answers[0], tuple):
            return functools.reduce(operator.add, answers) / self.num_tasks
        return tuple(functools.reduce(operator.add, values) / self.num_tasks for values in zip(*answers))

    def gradient(self) -> tuple[float, Tensor]:
        return self.mean("gradient_sum")

    def fisher_product(self, vector: Tensor) -> Tensor:
        return self.mean("fisher_product_sum", vector)

    def evaluate(self, theta: Tensor) -> tuple[float, float]:
        return self.mean("evaluate_sum", theta)


@dataclass(frozen=True)
class MetaStep:
    """What a meta-step did: TRPO's here, ProMP's (promp.py) too, which never backtracks."""

    theta: Tensor  # the parameters after the step (the old ones if no step was accepted)
    loss_before: float
    loss_after: float
    kl: float  # mean KL divergence of the new policies from those that collected the episodes (0 if no step)
    backtracks: int = 0  # reductions (by the backtrack ratio) before the accepted step
    accepted: bool = True
    finite: bool = True  # False: the gradient or its solve came out non-finite (the server rejects the step)


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
) -> MetaStep:
    """One TRPO step from ``theta`` on ``problem``."""
    loss, gradient = problem.gradient()
    product = lambda v: problem.fisher_product(v) + cg_damping * v  # noqa: E731
    direction = conjugate_gradient(product, gradient, cg_iters)
    curvature = float(direction @ product(direction))  # s^T F s: the full step's 2 x KL is max_kl's
    if not math.isfinite(curvature) or not bool(torch.isfinite(direction).all()):  # overflowed: a fault, counted
        return MetaStep(theta, loss, loss, 0.0, 0, False, finite=False)
    if not curvature > 0:  # a zero gradient: no step
        return MetaStep(theta, loss, loss, 0.0, 0, False)
    full_step = direction * (2 * max_kl / curvature) ** 0.5
    for backtracks in range(ls_max_steps):
        candidate = theta - ls_backtrack_ratio**backtracks * full_step
        new_loss, kl = problem.evaluate(candidate)
        if new_loss < loss and kl <= max_kl:
            return MetaStep(candidate, loss, new_loss, kl, backtracks, True)
    return MetaStep(theta, loss, loss, 0.0, ls_max_steps, False)
