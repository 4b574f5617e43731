"""Monitor: turns the parameter server's per-step metrics into TensorBoard scalars and a console
progress line (step, losses, tasks/s, ETA).

It computes the step-time breakdown (waiting for data, compute, aggregation, coordination) from
wall-clock stamps taken by the generator, the workers and the server; stamps from different nodes
assume synchronised clocks (NTP), as Ray's own timeline does. In asynchronous mode the breakdown is
per update, and the monitor also tracks how stale the updates were. The tags: README, "TensorBoard".
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import yaml
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from distmeta.config import Config, ConfigError
from distmeta.report import duration
from distmeta.runtime.control import Schedule, StepMetrics


class EventWriteError(ConfigError):
    """TensorBoard's events could not be written (a full disk); the message says what to do."""


@contextlib.contextmanager
def events_written(run_dir: Path):
    """Turn a failed TensorBoard write into a clear error. The writer is tensorboard's, with a
    background thread: its OSError surfaces at a later call, raised from that thread's traceback."""
    try:
        yield
    except OSError as err:
        raise EventWriteError(
            f"could not write TensorBoard events to {run_dir} ({err.strerror or err}): the disk is full or the "
            f"folder is not writable. Free space, then continue with `python launch.py --resume {run_dir}`: it "
            "goes on from the run's newest checkpoint (those written are untouched; only the steps since are "
            "re-run). If the run has no checkpoint yet, nothing is saved to resume: start it again"
        ) from None


def _report_thread_error(args, previous=threading.excepthook) -> None:
    """Python prints an uncaught thread exception with its traceback. TensorBoard's writer thread
    re-raises its write error so, and the writer raises it again at its next call, where
    ``events_written`` reports it clearly: print only the errors of other threads."""
    if isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError):
        return
    previous(args)


threading.excepthook = _report_thread_error


class CheckedWriter:
    """A SummaryWriter whose every call raises ``EventWriteError`` if it cannot write."""

    def __init__(self, run_dir: Path, **options):
        self.run_dir = run_dir
        with events_written(run_dir):
            self.writer = SummaryWriter(str(run_dir), **options)

    def __getattr__(self, name: str):
        attribute = getattr(self.writer, name)
        if not callable(attribute):
            return attribute

        def checked(*args, **kwargs):
            with events_written(self.run_dir):
                return attribute(*args, **kwargs)

        return checked


def run_writer(run_dir: Path, cfg: Config, start_step: int) -> CheckedWriter:
    """The run's TensorBoard writer, its config written as text. On resume it drops whatever the
    earlier part logged after its checkpoint (TensorBoard hides events at steps >= purge_step
    written before it), so no step appears twice."""
    writer = CheckedWriter(run_dir, purge_step=start_step + 1 if start_step else None)
    writer.add_text("config", "```yaml\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False) + "```", start_step)
    return writer


class Monitor:
    def __init__(self, run_dir: Path, cfg: Config, start_step: int = 0, out=sys.stdout, rejected_before: int = 0):
        """``rejected_before``: steps a resumed run's earlier part rejected (its count goes on from there)."""
        self.cfg, self.out, self.schedule = cfg, out, Schedule.of(cfg.train)
        self.writer = run_writer(run_dir, cfg, start_step)
        self.last_step = start_step  # steps re-run after a fault are not logged again
        self.sums: dict[str, float] = defaultdict(float)  # train/* per step, the rest per timed step
        self.counts: dict[str, int] = defaultdict(int)  # steps that had each train/* metric (*_before: logging steps)
        self.timed_steps = 0
        self.prev_apply_end: float | None = None
        self.prev_worker_end: dict[int, float] = {}
        self.last_print = time.time()
        self.recent_steps: list[float] = []
        self.latest: dict = {}
        self.total_tasks = self.total_step_s = 0.0  # every timed step of the run, for tasks_per_s
        self.rejected = rejected_before
        self.staleness: list[int] = []  # asynchronous mode: this logging window's updates
        self.recent_staleness: deque[int] = deque(maxlen=200)
        self.dropped = 0
        self.updates: dict[int, int] = defaultdict(int)  # per worker rank

    def record(self, m: StepMetrics) -> None:
        """One step's metrics from its meta-optimizer (``MetaOptimizer.apply``, through the parameter
        server's ``apply`` or ``push`` in asynchronous mode, or the first all-reduce worker's copy)."""
        if m.staleness is not None:
            self.staleness.append(m.staleness)
            self.recent_staleness.append(m.staleness)
            if m.dropped:
                self.dropped += 1
                return
            self.updates[m.workers[0].rank] += 1
        step = m.step + 1  # parameters after this many updates
        if step <= self.last_step:
            return
        self.last_step = step
        if m.rejected:  # nothing was applied: count it, keep it out of the training curves
            self.rejected += 1
            self.writer.add_scalar("faults/rejected_steps", self.rejected, step)
        else:
            for name, value in {**m.train, "lr": m.lr}.items():
                self.sums[f"train/{name}"] += value
                self.counts[f"train/{name}"] += 1
        if self.prev_apply_end is not None:
            step_s = m.apply_finished - self.prev_apply_end
            aggregate_s = m.apply_finished - m.apply_started
            compute = {w.rank: w.finished - w.started for w in m.workers}
            data_wait_s = max(
                max(0.0, w.produced_at - max(self.prev_apply_end, self.prev_worker_end.get(w.rank, 0.0)))
                for w in m.workers
            )
            compute_s = max(compute.values())
            breakdown = {
                "step_s": step_s,
                "data_wait_s": data_wait_s,
                "compute_s": compute_s,
                "aggregate_s": aggregate_s,
                "coordination_s": max(0.0, step_s - data_wait_s - compute_s - aggregate_s),
            }
            for name, value in breakdown.items():
                self.sums[f"time/{name}"] += value
            for rank, seconds in compute.items():
                self.sums[f"workers/{rank}/compute_s"] += seconds
            self.sums["throughput/tasks"] += m.num_tasks
            self.total_tasks += m.num_tasks
            self.total_step_s += step_s
            self.recent_steps = [*self.recent_steps[-199:], step_s]
            self.timed_steps += 1
        self.prev_apply_end = m.apply_finished
        self.prev_worker_end = {w.rank: w.finished for w in m.workers}
        self.latest = {**self.latest, **m.train, "step": step}  # *_before: from the last step that had it
        if self.schedule.logs(step):
            self._flush(step)
        if time.time() - self.last_print >= self.cfg.train.print_every_s or step == self.cfg.train.steps:
            self._print(step)

    def _flush(self, step: int) -> None:
        for name, total in self.sums.items():
            if name == "throughput/tasks":
                self.writer.add_scalar("throughput/tasks_per_s", total / self.sums["time/step_s"], step)
            elif name.startswith("train/"):
                self.writer.add_scalar(name, total / self.counts[name], step)
            else:
                self.writer.add_scalar(name, total / self.timed_steps, step)
        self.sums.clear()
        self.counts.clear()
        self.timed_steps = 0
        if self.staleness:
            self.writer.add_scalar("async/staleness_mean", sum(self.staleness) / len(self.staleness), step)
            self.writer.add_scalar("async/staleness_max", max(self.staleness), step)
            self.writer.add_histogram("async/staleness", np.array(self.staleness), step)
            self.writer.add_scalar("async/dropped_updates", self.dropped, step)
            for rank, count in self.updates.items():
                self.writer.add_scalar(f"workers/{rank}/updates", count, step)
            self.staleness = []

    def _print(self, step: int) -> None:
        self.last_print = time.time()
        total = self.cfg.train.steps
        step_s = sum(self.recent_steps) / max(1, len(self.recent_steps))
        m = self.latest
        line = f"step {step}/{total}"
        for name, short, digits in (("loss", "loss", 4), ("accuracy", "acc", 3)):
            if f"{name}_after" in m:  # an inner loop: the query score before (once logged) and after adaptation
                before = f"{m[f'{name}_before']:.{digits}f}" if f"{name}_before" in m else "?"
                line += f" | {short} {before} -> {m[f'{name}_after']:.{digits}f}"
            elif name in m:
                line += f" | {short} {m[name]:.{digits}f}"
        if step_s:  # none yet at the first step, which includes start-up
            rate, eta = self.cfg.train.meta_batch_size / step_s, duration((total - step) * step_s)
            shown = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"  # one 60-way episode a step: "0.25", not "0"
            line += f" | {shown} tasks/s | {step_s * 1e3:.1f} ms/step | ETA {eta}"
        if self.recent_staleness:
            recent = self.recent_staleness
            line += f" | staleness {sum(recent) / len(recent):.1f} (max {max(recent)}, {self.dropped} dropped)"
        print(line, file=self.out, flush=True)

    @property
    def tasks_per_s(self) -> float:
        """Steady-state throughput: all steps but the first (which includes start-up)."""
        return self.total_tasks / self.total_step_s if self.total_step_s else float("nan")

    def log_fault(self, step: int, recoveries: int) -> None:
        """A fault recovered from; the run goes on at ``step``."""
        self.writer.add_scalar("faults/recovered", recoveries, step)
        self.writer.flush()
        self.prev_apply_end = None  # the time since the last step includes the recovery: not a step time
        self.recent_steps.clear()

    def log_failed_validation(self, step: int, in_a_row: int) -> None:
        self.writer.add_scalar("faults/failed_validations_in_a_row", in_a_row, step)

    def log_eval(self, step: int, prefix: str, rows: list) -> list:
        """Write evaluation rows as scalars, onto the disk at once (``write_eval_scalars`` flushes);
        returns the rows."""
        write_eval_scalars(self.writer, step, prefix, rows)
        return rows

    def close(self, final_rows=None) -> None:
        close_with_hparams(self.writer, self.cfg, final_rows or [], self.latest.get("step", 0))


def validation_logged(run_dir: Path, step: int, rows: int) -> bool:
    """Whether the run's events hold a whole validation of ``rows`` rows at ``step``, read as
    TensorBoard reads them (events at or past a resumed part's purge step, written before it, do
    not count). The writer appends each scalar as it goes, so a run killed while logging one leaves
    part of it: that counts as none (four scalars a row, ``write_eval_scalars``)."""
    events = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})  # 0: every event, not a sample
    events.Reload()
    tags = [tag for tag in events.Tags()[SCALARS] if tag.startswith("val/")]
    return sum(any(event.step == step for event in events.Scalars(tag)) for tag in tags) >= 4 * rows


def validation_missing_on_resume(run_dir: Path, schedule: Schedule, step: int, rows: int) -> bool:
    """Whether a run resumed at ``step`` must validate it again: a validation step whose validation
    failed after its checkpoint was written, or was cut short by a kill (says so when it must)."""
    if not step or not schedule.publishes(step) or validation_logged(run_dir, step, rows):
        return False
    print(f"validating step {step} again: the earlier part ended before it was on disk", flush=True)
    return True


def close_with_hparams(writer: CheckedWriter, cfg: Config, final_rows: list, step: int) -> None:
    """Write the hyperparameters with the final evaluation as their metrics, then close ``writer``."""
    flat = _flatten(cfg.to_dict())
    metrics = {f"hparams/{r.tag}": r.mean for r in final_rows}
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, step)
    experiment, session_start, session_end = hparams(flat, metrics)
    with events_written(writer.run_dir):
        for summary in (experiment, session_start, session_end):
            writer.file_writer.add_summary(summary)
        writer.close()


def write_eval_scalars(writer: SummaryWriter, step: int, prefix: str, rows) -> None:
    for r in rows:
        tag = f"{prefix}/{r.tag}"
        writer.add_scalar(tag, r.mean, step)
        writer.add_scalar(tag + "_ci95", r.ci95, step)
        writer.add_scalar(tag + "_median", r.median, step)
        writer.add_scalar(tag + "_diverged", r.diverged, step)
    writer.flush()


def _flatten(tree: dict, prefix: str = "") -> dict:
    """Nested config -> {"section.key": scalar}; lists become JSON strings (hparams takes scalars)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) or value is None else value
    return flat
