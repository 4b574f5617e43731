"""The message that drives one training step through the actors."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepControl:
    step: int
    epoch: int = 0  # the engine generation that sent it: the server ignores steps of an earlier one
    checkpoint: str | None = None  # the parameter server writes a checkpoint here after this step
    publish: bool = False  # the parameter server returns the parameters with this step's metrics
