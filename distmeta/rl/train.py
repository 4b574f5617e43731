"""The meta-RL driver, top to bottom.

    task generator --tasks--> workers (episodes, kept) --summaries, sums--> server --metrics--> monitor
                                 ^                                             |
                                 +----------------- theta ---------------------+

One synchronous step at a time: a step is seconds of rollouts, so submitting ahead would gain
nothing. After every step the driver holds the server's ``LearnerState`` (theta and ProMP's Adam
moments: kilobytes), so a fault (an actor or node lost, a step past ``cluster.step_timeout_s``)
costs only the step in flight: every actor is replaced, the server restored from that state, and
the step re-run with the same tasks and episodes. Workers that cannot be placed again within
``cluster.rejoin_timeout_s`` (a lost node) leave the split; the step does not depend on it.
SIGINT and SIGTERM stop the run at the next logging step, with a checkpoint to resume from.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import ray
import ray.exceptions as rex
import torch

from distmeta.checkpoint import (
    FINAL_NAME,
    BestCheckpoint,
    CheckpointError,
    CheckpointStore,
    checkpoint_record,
    load_checkpoint,
    step_name,
)
from distmeta.config import AUTO, ClusterConfig, Config, ConfigError
from distmeta.report import format_rows
from distmeta.rl.distributed import RayMetaRL
from distmeta.rl.evaluate import evaluate_returns, protocol
from distmeta.rl.local import LearnerState
from distmeta.rl.monitor import MetaRLMonitor
from distmeta.rl.setup import MetaRLSetup, eval_episodes, eval_steps, is_meta_rl
from distmeta.run import RunInterrupted, TrainResult, checked_outputs, rejected_in_a_row
from distmeta.runfolder import claim, release
from distmeta.runtime.cluster import connect, describe_layout, plan_layout
from distmeta.runtime.control import Schedule
from distmeta.runtime.monitor import validation_missing_on_resume
from distmeta.runtime.supervisor import (
    MAX_RETRIES_OF_ONE_STEP,
    ActorFailed,
    ActorLost,
    actor_traceback,
    explain,
    is_fault,
)
from distmeta.runtime.watchdog import StopOnSignal

Result = TypeVar("Result")


def train_meta_rl(cfg: Config, run_dir: Path, resume: bool, started: float) -> TrainResult:
    """``train`` for a meta-RL config (checked by ``check_run``), named for ``run_dir``."""
    setup = MetaRLSetup.of(cfg)
    claim(run_dir)  # held until the run ends (a resume claimed it already, in prepare_resume)
    try:
        store = checked_outputs(cfg, run_dir, resume)
        state = initial_state(cfg, setup, store, resume)
        started_ray = connect(cfg.cluster)
        try:
            # rollouts run on CPUs, and a step's seconds of them are always worth splitting
            gpus = 0 if cfg.cluster.gpus_per_worker == AUTO else cfg.cluster.gpus_per_worker
            placed = plan_layout(
                dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, gpus_per_worker=gpus)),
                lambda: math.inf,
            )
            return _train(cfg, placed.cluster, setup, state, run_dir, store, started)
        finally:
            if started_ray:
                ray.shutdown()
    finally:
        release(run_dir)


def initial_state(cfg: Config, setup: MetaRLSetup, store: CheckpointStore, resume: bool) -> LearnerState:
    """The server's first state: ``train.seed``'s policy, the parameters of ``train.init_from``
    (at step 0, with a fresh meta-optimizer), or, resuming, the run's newest checkpoint."""
    learner, _, theta = setup.build()
    if resume:
        found = store.latest()
        if found is None:
            raise ConfigError(f"no valid checkpoint in {store.location} to resume from")
        location, saved = store.uri(found[0]), found[1]
        optimizer = {key: value.numpy() for key, value in saved["optimizer"].items()}
        rejected = [int(step) for step in saved.get("rejected_steps", [])]  # none recorded before 0.3
        state = LearnerState(saved["step"], saved["params"].numpy(), optimizer, rejected)
    elif cfg.train.init_from:
        location = cfg.train.init_from
        saved_cfg, params, saved = load_checkpoint(location)
        if not is_meta_rl(saved_cfg):
            raise ConfigError(
                f"train.init_from={location} is a {saved_cfg.algorithm.name} checkpoint, not a meta-RL policy"
            )
        print(f"starting from the parameters of {location} (step {saved['step']})", flush=True)
        state = LearnerState(0, params)
    else:
        return LearnerState(0, theta.numpy())
    if state.theta.size != theta.numel():
        raise CheckpointError(
            f"{location} holds {state.theta.size} parameters; this run's policy for {cfg.task.source} with "
            f"model.hidden={cfg.model.hidden} has {theta.numel()}: use a checkpoint of the same environment and policy"
        )
    state.theta = state.theta.astype(theta.numpy().dtype)
    try:
        learner.load_optimizer_state(
            torch.as_tensor(state.theta), {k: torch.as_tensor(v) for k, v in state.optimizer.items()}
        )
    except ValueError as err:
        raise CheckpointError(f"{location}: {err}") from None
    return state


def checkpoint_of(cfg: Config, state: LearnerState) -> dict:
    """A checkpoint of the run after ``state.step`` meta-steps: theta, the meta-step's own state, the
    steps rejected so far and the task generator's cursor (step t draws from ``(seed, t)``, so it is
    the step)."""
    optimizer = {key: torch.from_numpy(value) for key, value in state.optimizer.items()}
    return checkpoint_record(cfg, torch.from_numpy(state.theta), state.step) | {
        "optimizer": optimizer,
        "rejected_steps": list(state.rejected_steps),
        "next_draw": state.step,
    }


class Actors:
    """The run's actors, replaced whole after a fault (``run``)."""

    def __init__(self, cfg: Config, cluster: ClusterConfig, setup: MetaRLSetup, state: LearnerState):
        self.cfg, self.cluster, self.setup = cfg, cluster, setup
        self.recoveries = 0
        self.group = self._start(cluster.num_workers, state, cfg.cluster.placement_timeout_s)

    def _start(self, workers: int, state: LearnerState, timeout_s: float) -> RayMetaRL:
        """The actors, up within ``timeout_s``; workers that are not leave the split."""
        while True:
            group = RayMetaRL(self.setup, workers, self.cluster.cpus_per_worker, state, self.cluster.server_resource)
            try:
                up = group.ready(timeout_s)
            except rex.RayActorError as err:  # a constructor raised: a re-run would too
                group.close()
                raise ActorFailed(f"a meta-RL actor did not start: {explain(err)}") from None
            if all(up):
                return group
            group.close()
            if not all(up[:2]) or not any(up[2:]):
                raise ActorLost(
                    f"the meta-RL {'server or task generator' if not all(up[:2]) else 'workers'} did not start within "
                    f"{timeout_s:g} s: the cluster has no room for them (see `ray status`)"
                )
            workers = sum(up[2:])
            print(f"only {workers} worker(s) could be placed: the meta-batch is split over them", flush=True)

    def run(self, work: Callable[[RayMetaRL], Result], state: LearnerState, on_fault: Callable) -> Result:
        """``work(group)``; after a fault, again on new actors restored to ``state``."""
        for attempt in range(MAX_RETRIES_OF_ONE_STEP + 1):
            try:
                return work(self.group)
            except Exception as err:
                if not is_fault(err):
                    raise ActorFailed(explain(err) + actor_traceback(err)) from err
                if attempt == MAX_RETRIES_OF_ONE_STEP:
                    raise ActorLost(
                        f"step {state.step} failed {attempt + 1} times in a row; the last: {explain(err)}"
                    ) from err
                if 0 <= self.cfg.cluster.actor_restarts <= self.recoveries:
                    raise ActorLost(
                        f"a fault at step {state.step} ({explain(err)}), after {self.recoveries} recoveries: "
                        f"cluster.actor_restarts={self.cfg.cluster.actor_restarts} allows no more (-1: always recover)"
                    ) from err
                self.recoveries += 1
                workers = len(self.group.workers)
                self.group.close()
                self.group = self._start(workers, state, self.cfg.cluster.rejoin_timeout_s)
                on_fault(err, self.recoveries)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.group.close()


def _train(
    cfg: Config, cluster: ClusterConfig, setup: MetaRLSetup, state: LearnerState, run_dir: Path, store, started: float
) -> TrainResult:
    t = cfg.train
    actors = Actors(cfg, cluster, setup, state)
    try:
        shares = actors.group.shares
        print(
            f"run {run_dir} | {cfg.algorithm.name} on {cfg.task.source} | {describe_layout(cfg.cluster, cluster)} | "
            f"tasks {shares} | {t.steps} steps",
            flush=True,
        )
        if state.step:
            print(f"resuming at step {state.step} from {store.location}", flush=True)
        monitor = MetaRLMonitor(run_dir, cfg, state.step, rejected_before=len(state.rejected_steps))
        best = BestCheckpoint(cfg, store)
        first_step, train_started = state.step, time.time()
        stopped, state = _run_steps(cfg, actors, monitor, store, best, state, run_dir)
        train_s = time.time() - train_started
        try:
            monitor.writer.flush()
        finally:  # a failed events write still leaves the last step's checkpoint
            checkpoint = store.write(step_name(state.step), checkpoint_of(cfg, state))
            store.prune(t.checkpoint_keep)
            if state.step == t.steps:  # a stop in the last logging window still finished training
                checkpoint = store.write(FINAL_NAME, checkpoint_of(cfg, state))
        if stopped:
            monitor.close()
            raise RunInterrupted(stopped, state.step, checkpoint, run_dir, finished=state.step == t.steps)
        if best.row:
            print(
                f"best validation {best.row.tag} {best.row.mean:.4f} at step {best.step}: {best.location}", flush=True
            )
        print(f"checkpoint {checkpoint}; evaluating on {cfg.eval.num_tasks} held-out tasks", flush=True)
        print(protocol(cfg, "test", cfg.eval.num_tasks), flush=True)
        test = functools.partial(
            evaluate_returns,
            cfg=cfg,
            theta=state.theta,
            split="test",
            num_tasks=cfg.eval.num_tasks,
            progress=sys.stdout,
        )
        rows = actors.run(test, state, lambda err, recoveries: monitor.log_fault(state.step, recoveries))
    finally:
        actors.close()
    monitor.log_eval(state.step, "test", rows)
    print(format_rows(rows), flush=True)
    monitor.close(rows)
    wall = time.time() - started
    print(f"done in {wall:.1f} s ({train_s:.1f} s training); TensorBoard logs in {run_dir}", flush=True)
    latest = dataclasses.asdict(monitor.latest) if monitor.latest else {}
    return TrainResult(
        run_dir,
        checkpoint,
        best.location if best.row else None,
        latest,
        rows,
        t.meta_batch_size * (state.step - first_step) / train_s if train_s else float("nan"),
        train_s,
        wall,
        actors.recoveries,
    )


def _run_steps(cfg: Config, actors: Actors, monitor: MetaRLMonitor, store, best, state: LearnerState, run_dir: Path):
    """The loop proper: (the signal that stopped it or 0, the state after the last step)."""
    t, c, schedule = cfg.train, cfg.cluster, Schedule.of(cfg.train)
    in_a_row = rejected_in_a_row(state.rejected_steps, state.step)  # a resumed run's count goes on

    def recovered(err: Exception, recoveries: int) -> None:
        monitor.log_fault(state.step, recoveries)
        print(
            f"recovered from a fault at step {state.step} ({type(err).__name__}); re-running it on "
            f"{len(actors.group.workers)} worker(s), tasks {actors.group.shares}",
            flush=True,
        )

    def validate() -> None:
        validation = functools.partial(
            evaluate_returns, cfg=cfg, theta=state.theta, split="val", num_tasks=t.eval_tasks
        )
        rows = actors.run(validation, state, recovered)
        # best.pt first: a run killed between the two repeats the validation on resume (the events
        # lack it), where killed the other way round it would resume with best.pt short of it
        best.offer(state.step, state.theta, rows)
        monitor.log_eval(state.step, "val", rows)

    if validation_missing_on_resume(run_dir, schedule, state.step, len(eval_episodes(cfg)) * len(eval_steps(cfg))):
        validate()

    with StopOnSignal() as stop:
        while state.step < t.steps and not (stop.requested() and schedule.logs(state.step)):
            began = time.time()
            step = functools.partial(RayMetaRL.step, step=state.step, timeout_s=c.step_timeout_s)
            metrics, state = actors.run(step, state, recovered)
            state = state.owned()
            monitor.record(metrics, time.time() - began)
            in_a_row = in_a_row + 1 if metrics.rejected else 0
            if metrics.rejected:
                print(
                    f"step {metrics.step} rejected: its meta-step came out non-finite; nothing was applied", flush=True
                )
            if in_a_row >= t.max_rejected_steps:
                raise FloatingPointError(
                    f"{in_a_row} meta-steps in a row came out non-finite (the last at step {metrics.step}). "
                    "Start a new run with a lower algorithm.inner_lr, rl.max_kl or meta_optimizer.lr"
                )
            # the validation before the checkpoint, whose step a killed run (SIGKILL, the OOM killer)
            # resumes from with only the events on disk: it must find this step's validation there
            checkpoint = schedule.checkpoint(state.step) and state.step < t.steps
            try:
                if schedule.publishes(state.step):
                    validate()
                if checkpoint:
                    monitor.writer.flush()
            finally:  # a validation or events write that stops the run still leaves the checkpoint of its step
                if checkpoint:
                    store.write(step_name(state.step), checkpoint_of(cfg, state))
                    store.prune(t.checkpoint_keep)
    return stop.signum, state
