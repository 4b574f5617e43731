"""Parameter server: the Ray actor that owns the meta-optimizer (runtime/meta_optimizer.py) and
applies each step's updates to it, in the order and generation the driver sends.

Given a checkpoint folder, the server starts from the newest valid checkpoint there, so when Ray
restarts it after a crash it comes back at its last checkpoint instead of at the initialisation.
The server does not write checkpoints: at a checkpoint step it returns its meta-optimizer's
``state()`` with the step's metrics and the driver writes it (``checkpoint_state``), so that one
file holds the run however many servers hold its parameters.

With ``cluster.server_shards=K`` the flat vector is split across K servers, each holding the
slice ``bounds`` of it: each sums its slice of every worker's update and steps its own optimizer
on it (``join_metrics`` makes one step's metrics of theirs).

In asynchronous mode (``train.mode=async``) there are no common steps: each worker's update is
applied on its own as it arrives (``push``), and the step counter is the parameters' version. An
update computed on parameters more than ``train.max_staleness`` versions old is dropped or applied
with a smaller step (``train.stale_updates``); its staleness goes to the metrics either way.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from distmeta.checkpoint import CheckpointStore
from distmeta.config import Config
from distmeta.runtime.control import MetaOptimizerStatus, Schedule, StepControl, StepMetrics, WorkerUpdate
from distmeta.runtime.meta_optimizer import MetaOptimizer


class ParameterServer:
    def __init__(
        self,
        cfg: Config,
        initial_params: np.ndarray | int,
        checkpoints: str | None = None,
        bounds: tuple[int, int] | None = None,
    ):
        """``initial_params``: the run's initial meta-parameters, or just their number, when they
        come with the first ``begin_generation`` (as a Ray actor: a restarted actor gets its constructor
        arguments again only if they are small enough to travel inline, which no image model's are)."""
        self.cfg, self.schedule = cfg, Schedule.of(cfg.train)
        given = not isinstance(initial_params, int)
        self.size = len(initial_params) if given else initial_params
        self.bounds = bounds or (0, self.size)
        lo, hi = self.bounds
        self.initial = np.array(initial_params[lo:hi]) if given else None
        self.generation = 0  # the driver's current engine generation (see begin_generation)
        self.store = CheckpointStore(checkpoints) if checkpoints else None
        self.reload()

    def reload(self) -> int:
        """Start over from the newest valid checkpoint in the run's folder, or from the initial
        parameters if there is none yet (at start, and after another shard was restarted so that
        all agree again); returns the step. Without either, the parameters wait for begin_generation."""
        self.meta = MetaOptimizer.latest(self.cfg, self.store, self.initial, self.size, self.bounds)
        return self.step

    @property
    def step(self) -> int:
        """The step applied next (the parameters' version)."""
        return self.meta.step if self.meta else 0

    def status(self) -> MetaOptimizerStatus:
        """Where the server stands: the step it expects next, the checkpoint it started from, and in
        asynchronous mode the task stream's next unseen batch."""
        if self.meta is None:
            return MetaOptimizerStatus()
        return self.meta.status()

    def begin_generation(self, generation: int, initial: list | None = None) -> int:
        """From now on apply only steps sent by engine generation ``generation``: steps still in flight
        from before a fault may arrive late, computed on older parameters. Returns the step.
        ``initial``: [an object ref to] the initial parameters, for a server constructed without
        them (a list, so that Ray hands over the ref, fetched only by a server with no parameters)."""
        if self.meta is None and initial is not None:
            import ray  # a server runs in-process too (the local loop, tests)

            lo, hi = self.bounds
            self.initial = np.array(ray.get(initial[0])[lo:hi])
            self.reload()
        self.generation = generation
        return self.step

    def parameters(self, control: StepControl | None = None) -> np.ndarray:
        """The current meta-parameters, this server's slice (``control`` only orders this call within a step)."""
        if self.meta is None:
            raise RuntimeError(
                "parameter server restarted before the run's first checkpoint: it awaits begin_generation"
            )
        return self.meta.parameters()

    def apply(self, control: StepControl, *results: WorkerUpdate) -> StepMetrics:
        """Aggregate the workers' results for ``control.step``, apply them, return the step's metrics."""
        if control.generation != self.generation:
            return StepMetrics(control.step, stale=True)
        self.meta.check_step(control.step, results)
        return self.meta.attach(self.meta.apply(results), control.publish, control.checkpoint)

    def pull(self) -> tuple[StepControl, np.ndarray]:
        """Asynchronous mode: the current parameters and their version, for a worker's first update."""
        control = StepControl(self.step, self.generation, score_before=self.schedule.logs(self.step + 1))
        return control, self.parameters()

    def push(self, result: WorkerUpdate) -> tuple[StepMetrics, StepControl, np.ndarray]:
        """Asynchronous mode: apply one worker's update, computed on the parameters of version
        ``result.step``, as its own step, unless it is more than ``train.max_staleness`` versions
        old (then ``train.stale_updates``: drop it, or scale its step by (S + 1) / (staleness + 1)).
        Returns the metrics and the version the worker computes its next update on."""
        t = self.cfg.train
        if result.generation != self.generation:  # computed before a fault; its worker's chain was restarted
            return StepMetrics(self.step, stale=True), *self.pull()
        staleness = self.step - result.step
        self.meta.last_draw = max(self.meta.last_draw, result.draw)
        scale = 1.0
        if staleness > t.max_staleness:
            scale = 0.0 if t.stale_updates == "drop" else (t.max_staleness + 1) / (staleness + 1)
        # a dropped update changes nothing, not even the version
        metrics = self.meta.apply([result], scale) if scale else StepMetrics(self.step - 1, workers=[result.timing])
        metrics.staleness, metrics.scale, metrics.dropped = staleness, scale, not scale
        done = self.step
        publish = bool(scale) and self.schedule.publishes(done)
        metrics = self.meta.attach(metrics, publish, self.schedule.checkpoint(done) if scale else None)
        return metrics, *self.pull()

    def state(self) -> dict:
        """This server's slice of a checkpoint (``MetaOptimizer.state``)."""
        return self.meta.state()


def join_metrics(parts: list[StepMetrics]) -> StepMetrics:
    """One step's metrics from those of each shard: the first shard's, with the parameters it
    publishes and the state it checkpoints joined from all (the state as a list, one per shard)."""
    joined = dataclasses.replace(parts[0], apply_finished=max(part.apply_finished for part in parts))
    if joined.params is not None:
        joined.params = np.concatenate([part.params for part in parts])
    if joined.state is not None:
        joined.state = [part.state for part in parts]
    return joined
