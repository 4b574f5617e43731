"""The meta-training driver, top to bottom.

    task generators --tasks--> workers --updates--> parameter server --metrics--> monitor
                                  ^                        |
                                  +------ parameters ------+

Each step is one ``StepControl`` message pushed through the actors by an engine (a compiled Ray
graph or chained actor calls, see runtime/engine.py). The driver submits up to ``max_inflight_steps`` steps
ahead of the metrics it reads, so it never sits on the critical path; the meaning stays
synchronous: step t's update uses exactly the parameters after step t - 1.

Faults (a lost worker, server or node; a stuck worker) are handled by runtime/supervisor.py: the
steps in flight are dropped and re-run from the parameter server's step. SIGINT and SIGTERM stop
the run after the steps in flight, with a checkpoint to resume from (``launch.py --resume``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import sys
import time
from collections import deque
from pathlib import Path
from typing import NamedTuple

import numpy as np
import ray

from distmeta.algorithms import initial_parameters
from distmeta.assemble import check_new_run, check_run
from distmeta.checkpoint import (
    FINAL_NAME,
    BestCheckpoint,
    CheckpointStore,
    code_version,
    load_checkpoint,
    step_name,
)
from distmeta.config import Config, ConfigError
from distmeta.evaluate import (
    check_evaluation,
    collect_evaluation,
    eval_shots,
    eval_steps,
    evaluation_ready,
    protocol,
    submit_evaluation,
)
from distmeta.report import format_rows
from distmeta.resume import check_same_data
from distmeta.rl.setup import is_meta_rl
from distmeta.rl.train import train_meta_rl
from distmeta.run import (
    EvaluationFailed,
    RunInterrupted,
    TrainResult,
    checked_outputs,
    rejected_in_a_row,
    run_name,
)
from distmeta.runfolder import claim, release
from distmeta.runtime.cluster import (
    SPLIT_ABOVE_S,
    check_data_where_actors_run,
    connect,
    describe_layout,
    plan_layout,
)
from distmeta.runtime.control import Schedule, StepControl, StepMetrics
from distmeta.runtime.meta_optimizer import checkpoint_state
from distmeta.runtime.monitor import Monitor, validation_missing_on_resume
from distmeta.runtime.supervisor import ActorLost, Supervisor, explain
from distmeta.runtime.task_generator import split_evenly
from distmeta.runtime.watchdog import StepClock, StopOnSignal
from distmeta.runtime.worker import step_seconds
from distmeta.tasks import SOURCES, build_source


class InFlightCall(NamedTuple):
    """A call of the synchronous loop whose metrics are not read yet."""

    controls: list[StepControl]  # its steps, in order
    handle: object  # what the engine's result() reads them from


class PendingValidation(NamedTuple):
    """A validation running in the background on the parameters after ``at`` steps."""

    at: int
    params: np.ndarray
    pending: list  # submit_evaluation's chunks and their result refs


def train(cfg: Config, run_dir: Path | None = None, resume: bool = False) -> TrainResult:
    """Train ``cfg`` in ``run_dir``; with ``resume``, continue from the newest checkpoint there. A
    meta-RL config (``algorithm.name`` maml_trpo or promp) trains in ``rl.train``."""
    started = time.time()
    code_version()  # the code this run starts with, named by every checkpoint it writes (cached)
    check_run(cfg)  # a combination no component can run fails here, before Ray starts
    if not resume:
        check_new_run(cfg)
    run_dir = Path(run_dir or Path(cfg.logdir) / run_name(cfg))
    # checkpoints record the run they belong to; the algorithm section is the run's own copy, as
    # StepResults records auto's implementation in it (the caller's config keeps auto)
    cfg = dataclasses.replace(cfg, run_name=run_dir.name, algorithm=dataclasses.replace(cfg.algorithm))
    if is_meta_rl(cfg):
        return train_meta_rl(cfg, run_dir, resume, started)
    source = _checked_source(cfg)  # bad data fails here, before Ray starts
    cfg = _with_data_record(cfg, source)
    initial = _initial_parameters(cfg, source, resume)
    claim(run_dir)  # held until the run ends (a resume claimed it already, in prepare_resume)
    try:
        store = checked_outputs(cfg, run_dir, resume)
        started_ray = connect(cfg.cluster)
        try:
            placed = plan_layout(cfg, lambda: step_seconds(cfg, SPLIT_ABOVE_S))
            return _train(cfg, placed, source, run_dir, store, started, initial)
        finally:
            if started_ray:
                ray.shutdown()
    finally:
        release(run_dir)


def _checked_source(cfg: Config):
    """The run's task source, once every split the run samples has been checked at the sizes it
    samples them (training, validation and test episodes)."""
    source = build_source(cfg.task)
    needed = ["train", "test", *(["val"] if cfg.train.eval_every else [])]
    missing = [split for split in needed if split not in source.splits]
    if missing:
        raise ConfigError(
            f"task source {cfg.task.source} has no {' or '.join(missing)} split (it has {', '.join(source.splits)}); "
            + ("set train.eval_every=0 or " if missing == ["val"] else "")
            + "choose another task.split_scheme"
        )
    source.check("train", cfg.task.shots, cfg.task.queries)
    check_evaluation(cfg, needed[1:])
    return source


def _with_data_record(cfg: Config, source) -> Config:
    """The config with what every checkpoint must carry about its data: how its images were made
    (``task.image_format``, so ``distmeta adapt`` prepares new ones alike) and, for a source whose
    data is fingerprinted, the fingerprint (so the run can find its data again at another path);
    a config that holds one already (a resumed run) must find the same data."""
    task = dataclasses.replace(cfg.task, image_format=source.image_format)
    if SOURCES[cfg.task.source].fingerprinted:
        check_same_data(cfg, cfg)
        task = dataclasses.replace(task, shards_fingerprint=SOURCES[cfg.task.source].data_fingerprint(cfg.task))
    return dataclasses.replace(cfg, task=task)


def _initial_parameters(cfg: Config, source, resume: bool) -> np.ndarray:
    """The run's first meta-parameters: ``train.seed``'s initialisation, or the parameters of the
    checkpoint ``train.init_from`` names (then the run starts at step 0 with a fresh
    meta-optimizer). A resumed run restores its own checkpoint instead, so init_from is not read
    again (the file may be gone by then)."""
    initial = initial_parameters(cfg, source)
    if not cfg.train.init_from or resume:
        return initial
    saved, params, state = load_checkpoint(cfg.train.init_from)
    if params.size != initial.size or (saved.model.name, saved.model.head) != (cfg.model.name, cfg.model.head):
        raise ConfigError(
            f"train.init_from={cfg.train.init_from} holds {params.size} parameters of a {saved.model.name} "
            f"with a {saved.model.head} head ({saved.algorithm.name}, task.ways={saved.task.ways}); this run's "
            f"{cfg.model.name} with a {cfg.model.head} head ({cfg.algorithm.name}, task.ways={cfg.task.ways}) "
            f"has {initial.size}: use a checkpoint of the same "
            "model, head and algorithm family"
            + (
                " (an export of the baseline leaves out its head over the training classes: initialise from "
                "its run's own checkpoint)"
                if saved.task.labels == "class" and "optimizer" not in state
                else ""
            )
        )
    print(f"starting from the parameters of {cfg.train.init_from} (step {state['step']})", flush=True)
    return params.astype(initial.dtype)


def _train(
    cfg: Config, placed: Config, source, run_dir: Path, store: CheckpointStore, started: float, initial
) -> TrainResult:
    """``cfg`` as requested (what checkpoints record, ``auto`` included), ``placed`` with the layout
    it resolved to on this cluster (what the workers and the final evaluation get)."""
    t = cfg.train
    supervisor = Supervisor(cfg, initial, store.location, placed, (source.spec, source.kind))
    try:
        train_s, results, stopped = _run_steps(cfg, run_dir, supervisor, store)
        state = supervisor.checkpoint_state()
        done, final_params = state["step"], state["params"].numpy()
        try:
            results.logged_before_checkpoint(done + 1)  # the last step's validation too: training is over
        finally:  # a failed validation or events write still leaves the last step's checkpoint
            checkpoint = store.write(step_name(done), state)
            store.prune(t.checkpoint_keep)
            if done == t.steps:  # a stop in the last logging window still finished training
                checkpoint = store.write(FINAL_NAME, state)
    except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
        raise ActorLost(f"training stopped: {explain(err)}") from err  # a constructor's error, whole
    finally:  # also on failure or Ctrl-C: free the workers' resources for whatever runs next
        supervisor.close()
        supervisor.kill_all()
    monitor, best = results.monitor, results.best
    if stopped:
        monitor.close()
        raise RunInterrupted(stopped, done, checkpoint, run_dir, finished=done == t.steps)
    if results.failure and done < t.steps:  # finished: the test evaluation still runs
        monitor.close()
        raise EvaluationFailed(
            f"training stopped at step {done}: {results.failure}. Checkpoint {checkpoint}; once the validation "
            f"can run, resume with: python launch.py --resume {run_dir}"
        )
    if best.row:
        print(f"best validation {best.row.tag} {best.row.mean:.4f} at step {best.step}: {best.location}", flush=True)
    print(f"checkpoint {checkpoint}; evaluating on {cfg.eval.num_tasks} held-out tasks", flush=True)
    print(protocol(cfg, "test", cfg.eval.num_tasks), flush=True)
    pending = submit_evaluation(placed, final_params, "test", final=True)
    try:
        rows = collect_evaluation(cfg, pending, progress=sys.stdout)  # the run's log, beside the training progress line
    except ray.exceptions.RayError as err:
        monitor.close()
        raise EvaluationFailed(
            f"training finished, but its test evaluation failed: {explain(err)}. The trained parameters are in "
            f"{checkpoint}: test them with distmeta evaluate --checkpoint {checkpoint}"
        ) from err
    monitor.log_eval(t.steps, "test", rows)
    print(format_rows(rows), flush=True)
    monitor.close(rows)
    wall = time.time() - started
    print(f"done in {wall:.1f} s ({train_s:.1f} s training); TensorBoard logs in {run_dir}", flush=True)
    best_path = best.location if best.row else None
    return TrainResult(
        run_dir, checkpoint, best_path, monitor.latest, rows, monitor.tasks_per_s, train_s, wall, supervisor.recoveries
    )


def _run_steps(cfg: Config, run_dir: Path, supervisor: Supervisor, store: CheckpointStore):
    """The training loop proper; returns (seconds, the results it logged, the signal that stopped
    it or 0)."""
    c, t = cfg.cluster, cfg.train
    placed = supervisor.placed.cluster
    if t.mode == "async":
        tasks = f"{t.meta_batch_size} tasks each, max staleness {t.max_staleness} ({t.stale_updates} older)"
    else:
        tasks = f"tasks {split_evenly(t.meta_batch_size, placed.num_workers)}"
    print(
        f"run {run_dir} | {describe_layout(c, placed)} | {supervisor.engine_name} engine | {tasks} | {t.steps} steps",
        flush=True,
    )
    placement = supervisor.where()  # before the engine starts: its actors run nothing else
    check_data_where_actors_run(cfg, supervisor.data_readers(), c.step_timeout_s)  # where the final evaluation reads it
    _report_placement(cfg, run_dir, placement)
    start_step = supervisor.start()
    status = supervisor.status()  # a resumed run's: its counts of rejected steps go on
    if start_step:
        print(f"resuming at step {start_step} from {status.restored_from}", flush=True)
    monitor = Monitor(run_dir, cfg, start_step, rejected_before=len(status.rejected_steps))
    in_a_row = rejected_in_a_row(status.rejected_steps, start_step)
    results = StepResults(cfg, monitor, store, BestCheckpoint(cfg, store), in_a_row)
    rows_per_validation = len(eval_shots(cfg)) * len(eval_steps(cfg))
    if validation_missing_on_resume(run_dir, Schedule.of(t), start_step, rows_per_validation):
        results.validate(start_step, supervisor.checkpoint_state()["params"].numpy())
    started = time.time()
    with StopOnSignal() as stop:
        loop = _async_loop if t.mode == "async" else _sync_loop
        loop(cfg, supervisor, results, stop, start_step)
        supervisor.close()
    return time.time() - started, results, stop.signum


def _sync_loop(cfg: Config, supervisor: Supervisor, results: StepResults, stop: StopOnSignal, next_step: int):
    """Submit steps up to ``max_inflight_steps`` ahead of the one whose metrics are read next."""
    c, t, schedule = cfg.cluster, cfg.train, Schedule.of(cfg.train)
    clock = StepClock(c.step_timeout_s, c.straggler_factor)
    in_flight: deque[InFlightCall] = deque()
    while True:
        try:
            if supervisor.rejoin_ready():  # a lost worker is back: finish what is in flight, re-split
                while in_flight:
                    results.handle_all(supervisor.engine.result(in_flight.popleft().handle, clock.timeout()))
                supervisor.close()
                next_step = supervisor.start()
                clock.restart()
            # a stop lands on a logging boundary, so the resumed run's TensorBoard windows are whole
            stopping = (stop.requested() or results.failure) and schedule.logs(next_step)
            while next_step < t.steps and len(in_flight) <= c.max_inflight_steps and not stopping:
                chosen = results.cfg.algorithm.implementation  # auto's choice, once the first step made it
                controls = schedule.controls(
                    next_step, c.steps_per_call, supervisor.generation, "" if chosen == "auto" else chosen
                )
                in_flight.append(InFlightCall(controls, supervisor.engine.submit(controls)))
                next_step += len(controls)
                stopping = (stop.requested() or results.failure) and schedule.logs(next_step)
            if not in_flight:
                return
            controls, handle = in_flight[0]
            writes = any(control.checkpoint for control in controls)
            results.handle_all(supervisor.engine.result(handle, clock.timeout(writes, len(controls))))
            in_flight.popleft()
            clock.tick(len(controls))
            results.collect_evaluations()
        except Exception as err:  # a fault is recovered from; anything else propagates from recover()
            failed = in_flight[0].controls[0].step if in_flight else next_step
            dropped = [call.handle for call in in_flight]
            in_flight.clear()
            next_step = results.recover(supervisor, err, failed)
            _read_outcomes(dropped)
            clock.restart()


def _read_outcomes(dropped: list, timeout_s: float = 1.0) -> None:
    """Read what the steps dropped by a fault came to, so that Ray does not log each failed one
    as an "Unhandled error" with its traceback when its ref goes: the fault was reported once."""
    refs = [ref for step in dropped for ref in (step if isinstance(step, list) else [step])]
    refs = [ref for ref in refs if isinstance(ref, ray.ObjectRef)]  # a compiled graph's go with it
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
    for ref in ready:
        with contextlib.suppress(Exception):
            ray.get(ref, timeout=0)


def _async_loop(cfg: Config, supervisor: Supervisor, results: StepResults, stop: StopOnSignal, step: int):
    """Push each worker's update as it comes (runtime/engine.py's AsyncEngine) until the parameters
    reach version ``train.steps``. No straggler timeout: a slow worker holds back no one."""
    t, schedule = cfg.train, Schedule.of(cfg.train)
    while step < t.steps and not ((stop.requested() or results.failure) and schedule.logs(step)):
        try:
            if supervisor.rejoin_ready():  # the updates in the making are dropped: async loses nothing else
                supervisor.close()
                step = supervisor.start()
            metrics = supervisor.engine.next_update(cfg.cluster.step_timeout_s)
            if not metrics.stale:
                results.handle_all([metrics])
                step = metrics.step + 1
            results.collect_evaluations()
        except Exception as err:
            step = results.recover(supervisor, err, step)


class StepResults:
    """What the driver does with each step's metrics: log them, write the checkpoint the servers
    sent, report non-finite updates (and stop after too many in a row), and validate published
    parameters in the background (a validation that fails is reported and skipped; too many in a
    row set ``failure``, and the loop stops at the next logging step, with a checkpoint)."""

    MAX_FAILED_VALIDATIONS = 3  # in a row

    def __init__(
        self, cfg: Config, monitor: Monitor, store: CheckpointStore, best: BestCheckpoint, rejected_in_a_row: int = 0
    ):
        self.cfg, self.monitor, self.store, self.best = cfg, monitor, store, best
        self.evaluations: deque[PendingValidation] = deque()
        self.evaluated: set[int] = set()
        self.rejected_in_a_row = rejected_in_a_row
        self.failed_validations: list[int] = []  # the steps of the latest failed validations, in a row
        self.failure = ""  # why training must stop, once validation failed too often

    def handle_all(self, steps: list[StepMetrics]) -> None:
        """The metrics of one call's steps, in order. All are owned (``_owned``) before any is
        handled: a failed checkpoint write's traceback then holds no view of Ray's buffers."""
        steps = [_owned(metrics) for metrics in steps]
        for metrics in steps:
            self.handle(metrics)

    def handle(self, metrics: StepMetrics) -> None:
        """One step's metrics, owned (through ``handle_all``)."""
        t = self.cfg.train
        if self.cfg.algorithm.implementation == "auto" and metrics.implementation:
            # the first worker's timed choice, recorded by every later checkpoint (this config is the
            # one they write): a resumed run computes as this one did, where timing again could pick
            # another implementation, which rounds differently
            self.cfg.algorithm.implementation = metrics.implementation
            print(f"implementation (auto, timed at the first step): {metrics.implementation}", flush=True)
        try:
            self.monitor.record(metrics)
            if metrics.state is not None:
                self.logged_before_checkpoint(metrics.step + 1)
        finally:  # a failed events write (a full local disk) still leaves this step's checkpoint
            if metrics.state is not None:  # a CheckpointError (a full disk) stops the run; earlier ones stand
                metrics.checkpoint = self.store.write(metrics.checkpoint, checkpoint_state(self.cfg, metrics.state))
                metrics.state = None
                self.store.prune(t.checkpoint_keep)
        self.rejected_in_a_row = self.rejected_in_a_row + 1 if metrics.rejected else 0
        for bad in metrics.rejected:
            first, last = bad.tasks
            print(
                f"step {metrics.step} rejected: worker {bad.rank} sent a non-finite update for tasks "
                f"{first}..{last - 1} of the step's meta-batch (train.seed={t.seed}); nothing was applied",
                flush=True,
            )
        if self.rejected_in_a_row >= t.max_rejected_steps:
            raise FloatingPointError(
                f"{self.rejected_in_a_row} steps in a row had non-finite updates (the last at step {metrics.step}); "
                "none was applied. Start a new run with a lower algorithm.inner_lr or meta_optimizer.lr "
                "(a resumed run keeps them)"
            )
        at = metrics.step + 1
        if metrics.params is not None and at not in self.evaluated:  # a snapshot for validation, off the critical path
            params, metrics.params = metrics.params, None
            self.validate(at, params)

    def validate(self, at: int, params: np.ndarray) -> None:
        """Validate the parameters after ``at`` steps in the background (``collect_evaluations``)."""
        self.evaluated.add(at)
        pending = submit_evaluation(self.cfg, params, "val", self.cfg.train.eval_tasks)
        self.evaluations.append(PendingValidation(at, params, pending))

    def collect_evaluations(self, waiting_before: int = 0) -> None:
        """Log the validations that have finished, in order, and wait for those of the steps before
        ``waiting_before``, each up to ``cluster.step_timeout_s`` (a validation stuck on a read
        must not hold training up for ever: it is cancelled and counts as failed)."""
        while self.evaluations and (
            self.evaluations[0].at < waiting_before or evaluation_ready(self.evaluations[0].pending)
        ):
            at, params, pending = self.evaluations.popleft()
            try:
                rows = collect_evaluation(self.cfg, pending, timeout_s=self.cfg.cluster.step_timeout_s)
            except ray.exceptions.RayError as err:  # the validation's own (a val shard unreadable, memory)
                self.validation_failed(at, err)
                continue
            if self.failed_validations:  # the count back to 0 on TensorBoard
                self.failed_validations.clear()
                self.monitor.log_failed_validation(at, 0)
            # best.pt first: a run killed between the two repeats the validation on resume (the
            # events lack it), where killed the other way round it would resume with best.pt short of it
            self.best.offer(at, params, rows)
            self.monitor.log_eval(at, "val", rows)

    def validation_failed(self, at: int, err: Exception) -> None:
        """A long run is not lost to one failed validation (a read of remote storage that failed, the
        validation task killed for memory): it is reported, and best.pt keeps its earlier choice. One
        that fails every time (a bad val split) stops the run after a few, where it would otherwise
        train on unmonitored."""
        self.failed_validations.append(at)
        print(f"validation after {at} steps failed; training goes on without it: {explain(err)}", flush=True)
        self.monitor.log_failed_validation(at, len(self.failed_validations))
        if len(self.failed_validations) >= self.MAX_FAILED_VALIDATIONS and not self.failure:
            steps = ", ".join(map(str, self.failed_validations))
            self.failure = f"validation failed after steps {steps}, in a row; the last: {explain(err)}"

    def logged_before_checkpoint(self, step: int) -> None:
        """Put on disk what a checkpoint after ``step`` steps follows: a run killed once it is written
        (SIGKILL, the OOM killer) resumes from it with the events on disk alone, and the writer holds
        up to 2 minutes of them in memory. The validation at ``step`` itself runs on: a resumed run
        repeats it if it never reached the disk."""
        self.collect_evaluations(waiting_before=step)  # rarely waits: a validation takes fewer than eval_every steps
        self.monitor.writer.flush()

    def catch_up(self, supervisor: Supervisor, applied: range) -> None:
        """Steps the servers applied whose results a fault dropped (``applied``: their counts of
        steps done; a straggler may finish while its step is cancelled, and a call of several steps
        may fail after applying some): the checkpoint or validation one of them was due is made now,
        from the state after the last of them. Their training metrics are lost from TensorBoard."""
        schedule, t = Schedule.of(self.cfg.train), self.cfg.train
        checkpoint = any(schedule.checkpoint(done) for done in applied)
        validate = any(schedule.publishes(done) for done in applied) and applied[-1] not in self.evaluated
        if not (checkpoint or validate):
            return
        state = supervisor.checkpoint_state()
        at = state["step"]
        if validate:
            self.validate(at, state["params"].numpy())
        if checkpoint:
            # its validation too (at + 1): ``at`` may be off the schedule, and a resume from it would
            # not know to repeat a validation lost with the run
            self.logged_before_checkpoint(at + 1)
            self.store.write(step_name(at), state)
            self.store.prune(t.checkpoint_keep)

    def recover(self, supervisor: Supervisor, err: Exception, failed: int) -> int:
        """Recover from a fault at step ``failed`` (``Supervisor.recover``); returns the step to go on from."""
        next_step = supervisor.recover(err, failed)
        self.catch_up(supervisor, range(failed + 1, next_step + 1))
        self.monitor.log_fault(next_step, supervisor.recoveries)
        print(
            f"recovered from a fault at step {failed} ({type(err).__name__}); continuing at step {next_step} "
            f"with {len(supervisor.live)} worker(s), tasks {supervisor.shares}",
            flush=True,
        )
        return next_step


def _owned(metrics: StepMetrics) -> StepMetrics:
    """The step's metrics with arrays of their own. The parameters and checkpoint state arrive as
    zero-copy views of Ray's buffers (a compiled graph's shared-memory channel, which stays locked,
    and the graph stalled, while a view lives). A view kept past the step, say by the traceback of
    a failed checkpoint write, is released only at interpreter exit, after Ray has shut down: the
    driver then crashed (SIGSEGV in Ray's MutableObjectManager::ReadRelease) instead of exiting 2."""
    return copy.deepcopy(metrics) if metrics.params is not None or metrics.state is not None else metrics


def _report_placement(cfg: Config, run_dir: Path, placement: dict) -> None:
    """Print where the workers run and keep it in the run folder (placement.json)."""
    (run_dir / "placement.json").write_text(json.dumps(placement, indent=1))
    workers = placement["workers"]
    nodes = sorted({w["node_id"] for w in workers})
    where = ", ".join(f"{w['rank']}: {w['ip']} node {nodes.index(w['node_id'])} {w['device']}" for w in workers)
    print(f"placement ({cfg.cluster.placement}): {len(workers)} worker(s) on {len(nodes)} node(s): {where}", flush=True)
