"""The messages of a training step, and the schedule that fills them in.

``StepControl`` drives a step through the actors; each worker answers with a ``WorkerUpdate`` (the
sums over its tasks); the parameter server answers with ``StepMetrics``. Their arrays stay numpy,
so Ray moves them zero-copy. Between steps the supervisor asks a meta-optimizer (the parameter
server's, or an all-reduce worker's copy) where it stands: a ``MetaOptimizerStatus``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from distmeta.checkpoint import step_name


@dataclass(frozen=True)
class StepControl:
    step: int
    generation: int = 0  # the engine generation that sent it: the server ignores steps of an earlier one
    checkpoint: str | None = None  # the parameter server writes a checkpoint here after this step
    publish: bool = False  # the parameter server returns the parameters with this step's metrics
    # the workers also score the query set before adaptation (``loss_before``): a forward pass
    # that only feeds a metric, a fifth of a 1-shot Conv4 step, so training asks for it on
    # logging steps only (``Schedule.logs``)
    score_before: bool = True
    # the implementation the run computes with once ``auto`` chose (the first worker's timed choice,
    # which checkpoints record): a worker started after that, by a fault's recovery, takes it rather
    # than timing afresh and perhaps choosing one that rounds differently. Empty: none chosen yet
    implementation: str = ""


@dataclass(frozen=True)
class Schedule:
    """What happens after a step besides its update, from ``train.*``: the one answer for the
    synchronous driver, the asynchronous parameter server and the monitor. ``done`` counts the
    steps finished (a step's index from 0, plus one)."""

    steps: int
    log_every: int
    checkpoint_every: int
    eval_every: int

    @classmethod
    def of(cls, train) -> Schedule:
        """The schedule of a ``TrainConfig``."""
        return cls(train.steps, train.log_every, train.checkpoint_every, train.eval_every)

    def logs(self, done: int) -> bool:
        """A TensorBoard window ends here: every ``log_every`` steps, at each checkpoint and at the
        run's end. A stop lands on one, and a run resumed from a checkpoint starts a window there,
        so a resumed run's windows (and their averages) are the run left alone's."""
        checkpoints = self.checkpoint_every and done % self.checkpoint_every == 0
        return done % self.log_every == 0 or done == self.steps or bool(checkpoints)

    def checkpoint(self, done: int) -> str | None:
        """The checkpoint written after ``done`` steps, if one is."""
        return step_name(done) if self.checkpoint_every and done % self.checkpoint_every == 0 else None

    def publishes(self, done: int) -> bool:
        """The parameters after ``done`` steps are validated (in the background)."""
        return bool(self.eval_every) and done % self.eval_every == 0

    def controls(self, step: int, most: int, generation: int = 0, implementation: str = "") -> list[StepControl]:
        """The control messages of one call of up to ``most`` steps from ``step``, ending at the
        next logging step at the latest (where a stop lands, and the run's end)."""
        controls = [self.control(step, generation, implementation)]
        while len(controls) < most and not self.logs(controls[-1].step + 1):
            controls.append(self.control(controls[-1].step + 1, generation, implementation))
        return controls

    def control(self, step: int, generation: int = 0, implementation: str = "") -> StepControl:
        """The control message of step ``step`` (from 0), sent by engine generation ``generation``."""
        done = step + 1
        return StepControl(
            step,
            generation,
            checkpoint=self.checkpoint(done),
            publish=self.publishes(done),
            score_before=self.logs(done),
            implementation=implementation,
        )


@dataclass(frozen=True)
class WorkerTiming:
    """When a worker's part of a step happened (wall-clock seconds), for the time breakdown."""

    rank: int
    num_tasks: int
    produced_at: float  # the task generator had the worker's tasks ready
    started: float
    finished: float


@dataclass
class WorkerUpdate:
    """A worker's result for one step: the SUM over its tasks of their updates and of their metrics.
    The server divides by the step's task count, so the result does not depend on the split."""

    step: int  # the parameter version it was computed on
    generation: int  # the engine generation of the control message
    draw: int  # the batch of the task stream its tasks came from
    update: np.ndarray  # flat (with server shards: this shard's slice)
    finite: bool  # of the whole update, so every shard rejects a step alike
    first_task: int  # where its tasks sit in the step's meta-batch
    metrics: dict[str, float]
    implementation: str
    timing: WorkerTiming

    @property
    def rank(self) -> int:
        return self.timing.rank

    @property
    def num_tasks(self) -> int:
        return self.timing.num_tasks


@dataclass(frozen=True)
class Rejection:
    """A worker's non-finite update, which kept a step from being applied."""

    rank: int
    tasks: tuple[int, int]  # its tasks in the step's meta-batch: first, one past the last


@dataclass
class StepMetrics:
    """The parameter server's answer for a step (asynchronous mode: for one worker's update)."""

    step: int
    stale: bool = False  # sent by an earlier engine generation: ignored, nothing below is set
    lr: float = 0.0
    num_tasks: int = 0
    train: dict[str, float] = field(default_factory=dict)  # per-task means of the workers' metrics
    workers: list[WorkerTiming] = field(default_factory=list)
    implementation: str = ""
    rejected: list[Rejection] = field(default_factory=list)  # nothing was applied if any
    apply_started: float = 0.0
    apply_finished: float = 0.0
    params: np.ndarray | None = None  # the parameters after the step, when the control asked to publish
    checkpoint: str | None = None  # the checkpoint the control asked for
    state: dict | list | None = None  # MetaOptimizer.state for it (a list of the shards' once joined)
    # asynchronous mode: how many versions old the update's parameters were, the scale of its step
    staleness: int | None = None
    scale: float = 1.0
    dropped: bool = False  # too stale: not applied


@dataclass(frozen=True)
class MetaOptimizerStatus:
    """Where a meta-optimizer stands (``MetaOptimizer.status``); the defaults are a parameter server's
    that awaits its initial parameters."""

    step: int = 0  # the step due next (the parameters' version)
    restored_from: str | None = None  # the checkpoint it started from, if any
    next_draw: int = 0  # the task stream's next batch not yet seen in an update (the stream's cursor)
    rejected_steps: tuple[int, ...] = ()  # steps whose non-finite update was not applied
