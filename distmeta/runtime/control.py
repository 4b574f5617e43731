"""The message that drives one training step through the actors."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepControl:
    step: int
    epoch: int = 0  # the engine generation that sent it: the server ignores steps of an earlier one
    checkpoint: str | None = None  # the parameter server writes a checkpoint here after this step
    publish: bool = False  # the parameter server returns the parameters with this step's metrics
    # the workers also score the query set before adaptation (``loss_before``): a forward pass
    # that only feeds a metric, a fifth of a 1-shot Conv4 step, so training asks for it on
    # logging steps only (``scores_before``)
    score_before: bool = True


def scores_before(step: int, log_every: int, steps: int) -> bool:
    """Whether step ``step`` (from 0) scores the query set before adaptation: the last step of each
    TensorBoard window of ``train.log_every`` steps, and the run's last step."""
    done = step + 1
    return done % log_every == 0 or done == steps
