"""Parameter server: owns the meta-parameters and the meta-optimizer.

Each step it sums the workers' updates, divides by the number of tasks (a task-weighted mean, so
uneven splits count correctly), and takes one optimizer step: Adam on the meta-gradient for the
MAML family, SGD on theta - phi for Reptile (its outer step epsilon, optionally annealed).

A step is applied whole or not at all: if any worker's update holds a NaN or Inf, the step is
rejected (reported with the worker and its tasks) and nothing changes but the step counter. Given
a checkpoint folder, the server starts from the newest valid checkpoint there, so when Ray
restarts it after a crash it comes back at its last checkpoint instead of at the initialisation.
The server does not write checkpoints: at a checkpoint step it returns its ``state()`` with the
step's metrics and the driver writes it (``checkpoint_state``), so that one file holds the run
however many servers hold its parameters.

With ``cluster.server_shards=K`` the flat vector is split across K servers, each holding the
slice ``bounds`` of it: each sums its slice of every worker's update and steps its own optimizer
on it. Adam and SGD act element by element, so K shards compute what one server would. They agree
on rejecting a step because each worker flags its whole update as finite or not.

In asynchronous mode (``train.mode=async``) there are no common steps: each worker's update is
applied on its own as it arrives (``push``), and the step counter is the parameters' version. An
update computed on parameters more than ``train.max_staleness`` versions old is dropped or applied
with a smaller step (``train.stale_updates``); its staleness goes to the metrics either way.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time

import numpy as np
import torch

from distmeta.checkpoint import CheckpointError, CheckpointStore, checkpoint_record
from distmeta.config import Config
from distmeta.params import DTYPES
from distmeta.runtime.control import Rejection, Schedule, StepControl, StepMetrics, WorkerUpdate


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
        self.lo, self.hi = bounds or (0, self.size)
        self.initial = np.array(initial_params[self.lo : self.hi]) if given else None
        self.generation = 0  # the driver's current engine generation (see begin_generation)
        self.store = CheckpointStore(checkpoints) if checkpoints else None
        self.reload()

    def reload(self) -> int:
        """Start over from the newest valid checkpoint in the run's folder, or from the initial
        parameters if there is none yet (at start, and after another shard was restarted so that
        all agree again); returns the step. Without either, the parameters wait for begin_generation."""
        self.step = 0  # steps done so far (applied or rejected); also the parameter version
        self.rejected_steps: list[int] = []
        self.last_draw = -1  # asynchronous mode: the newest task batch an update came from
        self.restored_from = None
        found = self.store.latest() if self.store else None
        if found is None and self.initial is None:
            self.theta = None
            return self.step
        start = self.initial if self.initial is not None else np.zeros(self.hi - self.lo)  # the checkpoint's, below
        opt = self.cfg.meta_optimizer
        self.theta = torch.nn.Parameter(torch.tensor(start, dtype=DTYPES[self.cfg.train.dtype]))
        if opt.name == "adam":  # fused: one pass over the vector, 5-7x faster on CPU (benchmarks/ps_capacity.py)
            self.optimizer = torch.optim.Adam([self.theta], lr=opt.lr, fused=True)
        else:
            self.optimizer = torch.optim.SGD([self.theta], lr=opt.lr)
        if found:
            self.restored_from = self.store.uri(found[0])
            self._restore(found[1])
        return self.step

    def _restore(self, state: dict) -> None:
        if state["params"].numel() != self.size:
            raise CheckpointError(f"checkpoint holds {state['params'].numel()} parameters, this model has {self.size}")
        with torch.no_grad():
            self.theta.copy_(state["params"][self.lo : self.hi])
        self.optimizer.load_state_dict(_slice_optimizer_state(state["optimizer"], self.lo, self.hi))
        self.step, self.rejected_steps = state["step"], list(state.get("rejected_steps", []))
        self.last_draw = state.get("task_stream", {}).get("next_draw", 0) - 1
        rng = state.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])

    def status(self) -> dict:
        """Where the server stands: the step it expects next, the checkpoint it started from, and in
        asynchronous mode the task stream's next unseen batch."""
        return {"step": self.step, "restored_from": self.restored_from, "next_draw": self.next_draw()}

    def next_draw(self) -> int:
        return self.last_draw + 1 if self.cfg.train.mode == "async" else self.step

    def begin_generation(self, generation: int, initial: list | None = None) -> int:
        """From now on apply only steps sent by engine generation ``generation``: steps still in flight
        from before a fault may arrive late, computed on older parameters. Returns the step.
        ``initial``: [an object ref to] the initial parameters, for a server constructed without
        them (a list, so that Ray hands over the ref, fetched only by a server with no parameters)."""
        if self.theta is None and initial is not None:
            import ray  # a server runs in-process too (all-reduce replicas, tests)

            self.initial = np.array(ray.get(initial[0])[self.lo : self.hi])
            self.reload()
        self.generation = generation
        return self.step

    def parameters(self, control: StepControl | None = None) -> np.ndarray:
        """The current meta-parameters, this server's slice (``control`` only orders this call within a step)."""
        if self.theta is None:
            raise RuntimeError(
                "parameter server restarted before the run's first checkpoint: it awaits begin_generation"
            )
        return self.theta.detach().numpy()

    def learning_rate(self, step: int) -> float:
        opt = self.cfg.meta_optimizer
        if opt.decay_every:
            return opt.lr * opt.decay_factor ** (step // opt.decay_every)
        if opt.final_lr is None:
            return opt.lr
        progress = min(1.0, step / max(1, self.cfg.train.steps - 1))
        return opt.lr + (opt.final_lr - opt.lr) * progress

    def apply(self, control: StepControl, *results: WorkerUpdate) -> StepMetrics:
        """Aggregate the workers' results for ``control.step``, apply them, return the step's metrics."""
        started, step = time.time(), control.step
        if control.generation != self.generation:
            return StepMetrics(step, stale=True)
        if step != self.step or any(r.step != step for r in results):
            raise RuntimeError(
                f"parameter server is at step {self.step} but got updates for steps {[r.step for r in results]}"
            )
        metrics = self._update(results, started)
        if control.publish and not metrics.rejected:
            metrics.params = self.theta.detach().numpy().copy()
        if control.checkpoint:
            metrics.checkpoint, metrics.state = control.checkpoint, self.state()
        metrics.apply_finished = time.time()
        return metrics

    def pull(self) -> tuple[StepControl, np.ndarray]:
        """Asynchronous mode: the current parameters and their version, for a worker's first update."""
        control = StepControl(self.step, self.generation, score_before=self.schedule.logs(self.step + 1))
        return control, self.parameters()

    def push(self, result: WorkerUpdate) -> tuple[StepMetrics, StepControl, np.ndarray]:
        """Asynchronous mode: apply one worker's update, computed on the parameters of version
        ``result.step``, as its own step, unless it is more than ``train.max_staleness`` versions
        old (then ``train.stale_updates``: drop it, or scale its step by (S + 1) / (staleness + 1)).
        Returns the metrics and the version the worker computes its next update on."""
        started, t = time.time(), self.cfg.train
        if result.generation != self.generation:  # computed before a fault; its worker's chain was restarted
            return StepMetrics(self.step, stale=True), *self.pull()
        staleness = self.step - result.step
        self.last_draw = max(self.last_draw, result.draw)
        scale = 1.0
        if staleness > t.max_staleness:
            scale = 0.0 if t.stale_updates == "drop" else (t.max_staleness + 1) / (staleness + 1)
        if scale:
            metrics = self._update([result], started, scale)
        else:  # nothing changes, not even the version
            metrics = StepMetrics(self.step - 1, workers=[result.timing])
        metrics.staleness, metrics.scale, metrics.dropped = staleness, scale, not scale
        done, checkpoint = self.step, self.schedule.checkpoint(self.step)
        if scale and self.schedule.publishes(done) and not metrics.rejected:
            metrics.params = self.theta.detach().numpy().copy()
        if scale and checkpoint:
            metrics.checkpoint, metrics.state = checkpoint, self.state()
        metrics.apply_finished = time.time()
        return metrics, *self.pull()

    def _update(self, results: list[WorkerUpdate], started: float, scale: float = 1.0) -> StepMetrics:
        """One optimizer step on the task-weighted mean of ``results``' updates (its learning rate
        times ``scale``), unless one holds a NaN or Inf or their sum overflows; the step counts either way."""
        step = self.step
        num_tasks = sum(r.num_tasks for r in results)
        lr = self.learning_rate(step)
        total = results[0].update.copy()
        for result in results[1:]:
            total += result.update
        bad = [r for r in results if not r.finite]  # each worker checked its whole update
        if not bad and not np.isfinite(total).all():  # finite updates whose sum overflowed
            if (self.lo, self.hi) != (0, self.size):  # the other shards cannot know: stop rather than diverge
                raise FloatingPointError(
                    f"step {step}: the sum of the workers' updates overflowed in parameters {self.lo}..{self.hi - 1}; "
                    "start a new run with a lower meta_optimizer.lr or algorithm.inner_lr (a resume keeps them)"
                )
            bad = results
        rejected = [Rejection(r.rank, (r.first_task, r.first_task + r.num_tasks)) for r in bad]
        if rejected:
            self.rejected_steps.append(step)
        else:
            total /= num_tasks
            for group in self.optimizer.param_groups:
                group["lr"] = lr * scale
            self.theta.grad = torch.from_numpy(total).to(self.theta.dtype)
            self.optimizer.step()
        self.step += 1
        return StepMetrics(
            step,
            lr=lr,
            num_tasks=num_tasks,
            train={name: sum(r.metrics[name] for r in results) / num_tasks for name in results[0].metrics},
            workers=[r.timing for r in results],
            implementation=results[0].implementation,
            apply_started=started,
            rejected=rejected,
        )

    def state(self) -> dict:
        """What a checkpoint needs from this server: its slice of the parameters and of the
        optimizer's state, the step, and the task stream's cursor (``checkpoint_state`` joins the
        shards' into one checkpoint)."""
        return {
            "params": self.theta.detach().clone(),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),  # a snapshot, not the live moments
            "step": self.step,
            # Training draws its randomness from (seed, stream, step) alone: the cursor below is the
            # task stream's whole state. The process RNGs ride along for code that draws from them.
            # (asynchronous mode: the next batch of the stream not yet seen in an update)
            "task_stream": {"seed": self.cfg.train.seed, "next_step": self.step, "next_draw": self.next_draw()},
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            "rejected_steps": self.rejected_steps,
        }


def checkpoint_state(cfg: Config, parts: list[dict]) -> dict:
    """One checkpoint from the ``state()`` of each of the run's servers, in shard order."""
    if len({part["step"] for part in parts}) != 1:
        raise RuntimeError(f"parameter-server shards are at different steps: {[part['step'] for part in parts]}")
    optimizer = copy.deepcopy(parts[0]["optimizer"])
    for index, values in optimizer["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value) and value.dim() > 0:  # per parameter (not Adam's step count)
                values[key] = torch.cat([part["optimizer"]["state"][index][key] for part in parts])
    joined = parts[0] | {"optimizer": optimizer}
    return joined | checkpoint_record(cfg, torch.cat([part["params"] for part in parts]), parts[0]["step"])


def join_metrics(parts: list[StepMetrics]) -> StepMetrics:
    """One step's metrics from those of each shard: the first shard's, with the parameters it
    publishes and the state it checkpoints joined from all (the state as a list, one per shard)."""
    joined = dataclasses.replace(parts[0], apply_finished=max(part.apply_finished for part in parts))
    if joined.params is not None:
        joined.params = np.concatenate([part.params for part in parts])
    if joined.state is not None:
        joined.state = [part.state for part in parts]
    return joined


def _slice_optimizer_state(state: dict, lo: int, hi: int) -> dict:
    """An optimizer state dict for the whole vector, cut to the slice [lo, hi)."""
    state = copy.copy(state)
    state["state"] = {
        index: {k: v[lo:hi].clone() if torch.is_tensor(v) and v.dim() > 0 else v for k, v in values.items()}
        for index, values in state["state"].items()
    }
    return state
