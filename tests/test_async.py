"""Asynchronous mode (train.mode=async): each worker updates the parameters on its own. The server
applies an update if it is at most max_staleness versions old, and drops or scales older ones; a
slow worker holds back no one; training still converges; a lost worker costs only its update."""

import contextlib
import os
import re
import signal
import threading
import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_faults import Saboteur, processes
from test_runtime import in_process, saved_params, small

from distmeta.algorithms import initial_parameters
from distmeta.checkpoint import CheckpointStore, read_checkpoint, step_name
from distmeta.config import ConfigError
from distmeta.evaluate import evaluate
from distmeta.resume import prepare_resume
from distmeta.runtime.control import Rejection, StepControl, WorkerTiming, WorkerUpdate
from distmeta.runtime.meta_optimizer import checkpoint_state
from distmeta.runtime.parameter_server import ParameterServer
from distmeta.tasks import build_source
from distmeta.train import train


def update(version: int, values, rank: int = 0, generation: int = 0, draw: int = 0, num_tasks: int = 2) -> WorkerUpdate:
    """A worker's result as ``Worker.compute`` returns it: the sum of ``num_tasks`` task updates."""
    return WorkerUpdate(
        step=version,
        generation=generation,
        draw=draw,
        update=np.asarray(values, dtype=np.float64),
        finite=bool(np.isfinite(values).all()),
        first_task=0,
        metrics={"loss": 1.0 * num_tasks},
        implementation="loop",
        timing=WorkerTiming(rank, num_tasks, 0.0, 0.0, 0.0),
    )


@pytest.mark.parametrize("policy", ["drop", "scale"])
def test_the_server_applies_fresh_updates_and_drops_or_scales_stale_ones(tmp_path, policy):
    cfg = small(
        "train.mode=async",
        "train.max_staleness=1",
        f"train.stale_updates={policy}",
        "meta_optimizer.name=sgd",
        "meta_optimizer.lr=0.5",
    )
    server = ParameterServer(cfg, np.zeros(3), str(tmp_path / "checkpoints"))
    lr, grad = 0.5, np.array([2.0, -4.0, 6.0])  # a sum over 2 tasks: the mean is grad / 2
    for version in range(3):  # fresh updates (staleness 0) move the version on
        metrics, control, params = server.push(update(version, grad, draw=version))
        assert metrics.staleness == 0 and not metrics.dropped and control.step == version + 1
    before = server.parameters().copy()
    np.testing.assert_allclose(before, -3 * lr * grad / 2)
    metrics, control, params = server.push(update(2, grad, draw=7))  # 1 version old: within the bound
    assert metrics.staleness == 1 and metrics.scale == 1.0 and control.step == 4
    np.testing.assert_allclose(params, before - lr * grad / 2)
    before = params.copy()
    metrics, control, params = server.push(update(0, grad, draw=3))  # 4 versions old: beyond it
    assert metrics.staleness == 4
    if policy == "drop":
        assert metrics.dropped and control.step == 4
        np.testing.assert_array_equal(params, before)
    else:  # the step shrinks by (S + 1) / (staleness + 1) = 2 / 5
        assert not metrics.dropped and metrics.scale == pytest.approx(0.4) and control.step == 5
        np.testing.assert_allclose(params, before - 0.4 * lr * grad / 2)
    stale, control, _ = server.push(update(control.step, grad, generation=-1))  # from before a fault
    assert stale.stale
    store = CheckpointStore(str(tmp_path / "checkpoints"))
    store.write(step_name(5), checkpoint_state(cfg, [server.state()]))  # the stream's cursor: after draw 7
    state = store.read(step_name(5))
    assert state["task_stream"]["next_draw"] == 8
    assert ParameterServer(cfg, np.zeros(3), str(tmp_path / "checkpoints")).status().next_draw == 8


def test_a_non_finite_asynchronous_update_is_rejected(tmp_path):
    cfg = small("train.mode=async", "meta_optimizer.name=sgd")
    server = ParameterServer(cfg, np.ones(2))
    metrics, _, params = server.push(update(0, [np.nan, 1.0], rank=1))
    assert metrics.rejected == [Rejection(rank=1, tasks=(0, 2))]
    np.testing.assert_array_equal(params, np.ones(2))


def test_asynchronous_mode_checks_its_settings():
    with pytest.raises(ConfigError, match=r"max_staleness >= 3"):
        small("train.mode=async", "cluster.num_workers=4", "train.max_staleness=1")
    small("train.mode=async", "cluster.num_workers=4", "train.max_staleness=1", "train.stale_updates=scale")
    with pytest.raises(ConfigError, match="cluster.engine=auto or tasks"):
        small("train.mode=async", "cluster.engine=compiled")
    small("train.mode=async", "cluster.num_workers=9", "train.max_staleness=8")  # more workers than tasks: fine


def test_one_asynchronous_worker_is_the_synchronous_loop(ray_local, tmp_path):
    """Alone, a worker's updates are never stale and it takes the stream's batches in order."""
    cfg = small("train.mode=async", "train.steps=20")
    result = train(cfg, tmp_path / "run")
    expected, _ = in_process(cfg)
    np.testing.assert_allclose(saved_params(result), expected, rtol=1e-10, atol=1e-12)


class Slowdown(threading.Thread):
    """Freezes one actor of class ``role`` (SIGSTOP) for ``stop_s`` out of every ``stop_s + run_s``
    seconds until ``done`` exists: a worker on a machine ten times slower than the others."""

    def __init__(self, role: str, done, stop_s: float = 0.2, run_s: float = 0.02):
        super().__init__(daemon=True)
        self.role, self.done, self.stop_s, self.run_s = role, done, stop_s, run_s
        self.pid = None

    def run(self):
        deadline = time.time() + 300
        while not self.done.exists() and time.time() < deadline:
            found = processes(self.role)
            if not found:
                time.sleep(0.05)
                continue
            self.pid = self.pid or found[0].pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGSTOP)
                time.sleep(self.stop_s)
                os.kill(self.pid, signal.SIGCONT)
            time.sleep(self.run_s)
        self.resume()

    def resume(self):
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)


def slowed_run(tmp_path, name: str, *overrides):
    """A 2-worker sinusoid MAML run with one worker slowed down; returns (config, result)."""
    cfg = small(
        "train.dtype=float32",
        "train.meta_batch_size=10",
        "train.log_every=20",
        "train.checkpoint_every=0",
        "meta_optimizer.lr=0.01",
        "cluster.num_workers=2",
        "cluster.engine=tasks",
        "cluster.straggler_factor=0",  # the synchronous run must wait for the slow worker, not restart it
        "eval.num_tasks=100",
        "eval.inner_steps=[10]",
        *overrides,
    )
    slowdown = Slowdown("Worker", tmp_path / name / "checkpoints" / f"step_{cfg.train.steps:08d}.pt")
    slowdown.start()
    try:
        return cfg, train(cfg, tmp_path / name)
    finally:
        slowdown.resume()
        slowdown.join(timeout=5)


def test_a_slow_worker_does_not_hold_back_the_others_and_training_converges(ray_local, tmp_path):
    _, sync = slowed_run(tmp_path, "sync", "train.steps=20")
    cfg, result = slowed_run(tmp_path, "async", "train.steps=600", "train.mode=async", "train.max_staleness=4")
    sync_rate, async_rate = 20 / sync.train_s, 600 / result.train_s
    # Synchronous steps go at the frozen worker's pace; asynchronous updates at the free one's.
    assert async_rate > 5 * sync_rate, (sync_rate, async_rate)

    events = EventAccumulator(str(result.run_dir), size_guidance={"histograms": 0})
    events.Reload()
    logged = events.Tags()["scalars"]
    tags = [f"workers/{rank}/updates" for rank in (0, 1)]
    updates = sorted(events.Scalars(tag)[-1].value if tag in logged else 0 for tag in tags)
    # the free worker did most: the frozen one runs 1/11 of the time, so its share tends to 1/12 (the
    # bound leaves room for a loaded machine, which a ratio near 11 would not)
    assert sum(updates) == 600 and updates[1] > 3 * updates[0], updates
    assert max(e.value for e in events.Scalars("async/staleness_max")) > 4  # the slow one's were stale...
    assert events.Scalars("async/dropped_updates")[-1].value >= 1  # ...and dropped
    assert events.Histograms("async/staleness")
    assert [e.step for e in events.Scalars("train/loss_after")][-1] == 600

    # Converges: after 10 inner steps the test MSE is well below the initialisation's (5.6; the
    # same 600 steps taken synchronously in one process reach 0.84).
    initial = initial_parameters(cfg, build_source(cfg.task))
    (before,) = evaluate(cfg, initial)
    (after,) = result.eval_rows
    assert after.mean < 0.4 * before.mean, (before.mean, after.mean)


def test_a_killed_asynchronous_worker_costs_only_its_update(ray_local, tmp_path, capsys):
    cfg = small("train.mode=async", "train.steps=300", "cluster.num_workers=2", "train.checkpoint_every=25")
    saboteur = Saboteur(tmp_path / "run", "Worker", [50])
    saboteur.start()
    result = train(cfg, tmp_path / "run")
    assert saboteur.hits and result.recoveries == 1
    assert result.final_metrics["step"] == 300
    assert np.isfinite(saved_params(result)).all()
    # the server kept every update it had applied: the run went on from where it was, not from a checkpoint
    failed, resumed = map(
        int, re.search(r"fault at step (\d+) .*continuing at step (\d+)", capsys.readouterr().out).groups()
    )
    assert resumed >= failed >= 50
    events = EventAccumulator(str(result.run_dir))
    events.Reload()
    applied = [events.Scalars(tag)[-1] for tag in events.Tags()["scalars"] if tag.endswith("/updates")]
    assert {e.step for e in applied} == {300} and sum(e.value for e in applied) == 300  # none applied twice


def test_the_worker_result_carries_what_the_server_needs():
    """The fields ``push`` reads come from ``Worker.compute`` itself, not only from this file's fake."""
    from distmeta.runtime.task_generator import TaskGenerator
    from distmeta.runtime.worker import Worker

    cfg = small("train.mode=async")
    generator = TaskGenerator(cfg, [cfg.train.meta_batch_size], [0], start_draw=5, stride=3)
    first, second = generator.next_batch(), generator.next_batch()
    assert (first.draw, second.draw) == (5, 8)
    params = initial_parameters(cfg, build_source(cfg.task))
    result = Worker(cfg, device=torch.device("cpu")).compute(StepControl(4, generation=2), first, params)
    assert (result.step, result.generation, result.draw, result.num_tasks) == (4, 2, 5, 7)


def test_an_asynchronous_run_resumes_at_its_checkpoint_with_the_task_stream_cursor(ray_local, tmp_path):
    """A single asynchronous worker is deterministic, so resuming it from step 20 must give the
    run left alone: the same parameters, optimizer state and, from the cursor, the same batches."""
    cfg = small("train.mode=async", "train.steps=40", "train.checkpoint_every=10", "train.checkpoint_keep=0")
    expected = saved_params(train(cfg, tmp_path / "a"))
    cfg, run_dir = prepare_resume(str(tmp_path / "a" / "checkpoints" / step_name(20)), [], {})
    assert read_checkpoint(run_dir / "checkpoints" / step_name(20))["task_stream"]["next_draw"] == 20
    np.testing.assert_allclose(saved_params(train(cfg, run_dir, resume=True)), expected, rtol=1e-10, atol=1e-12)
