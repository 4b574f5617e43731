"""How a step travels through the actors. Both engines mean the same thing: step t's workers use
exactly the parameters after step t - 1, and the driver may submit steps ahead of their results.

  compiled  one Ray compiled graph for the whole run: the actors exchange the step's control
            message, parameters, tasks and updates over shared-memory channels, with no per-step
            task scheduling. Per-step coordination is about a third of ``tasks``'s. But Ray's channel
            reads busy-wait: every actor waiting for its input holds a core.
  tasks     ordinary actor calls chained through object refs. Works wherever Ray does.
  auto      (default) compiled for GPU workers and single-threaded CPU workers; tasks for CPU
            workers with several threads, whose cores the waiting actors would take (measured on
            2 cores, MAML Conv4: 1 worker x 2 threads 34 tasks/s with tasks, 23 with compiled);
            tasks also for GPU workers allowed to fall back to the CPU (``cluster.cpu_fallback``).

While a compiled graph is live its actors run nothing else, so checkpoints and parameter snapshots
for evaluation ride on the step's control message instead of separate calls.

Asynchronous mode (``train.mode=async``) has no common steps, and its own engine, ``AsyncEngine``.
"""

from __future__ import annotations

import contextlib
import time

import ray
from ray.dag import InputNode

from distmeta.runtime.control import StepControl

PACE_ABOVE_S = 0.02  # shorter steps: sleeping costs more latency than the busy-wait costs CPU


class CompiledEngine:
    def __init__(self, server, workers, feeds, max_inflight_steps: int, timeout_s: float):
        with InputNode() as control:
            params = server.parameters.bind(control)
            results = [
                worker.compute.bind(control, params, feeds[rank].batch_for.bind(control, rank))
                for rank, worker in enumerate(workers)
            ]
            graph = server.apply.bind(control, *results)
        self.graph = graph.experimental_compile(
            _max_inflight_executions=max_inflight_steps + 1, _submit_timeout=timeout_s
        )

        self.step_s, self.last_result = 0.0, time.perf_counter()

    def submit(self, control: StepControl):
        return self.graph.execute(control)

    def result(self, ref, timeout_s: float) -> dict:
        """A step's metrics. Reading a compiled graph's output busy-waits, which would take a core
        from the workers on a small machine, so first sleep through most of the expected wait."""
        if self.step_s > PACE_ABOVE_S:
            time.sleep(max(0.0, 0.8 * (self.last_result + self.step_s - time.perf_counter())))
        metrics = ray.get(ref, timeout=timeout_s)
        now = time.perf_counter()
        self.step_s = 0.9 * self.step_s + 0.1 * (now - self.last_result)  # moving average of the step time
        self.last_result = now
        return metrics

    def close(self, cancel: bool = False) -> None:
        self.graph.teardown()


class TaskEngine:
    def __init__(self, server, workers, feeds, max_inflight_steps: int, timeout_s: float):
        self.server, self.workers, self.feeds = server, workers, feeds
        self.params = server.parameters.remote()
        self.in_flight: list = []  # the calls of recent steps, cancelled on close
        self.kept = (max_inflight_steps + 2) * (len(workers) + 2)

    def submit(self, control: StepControl):
        results = [
            worker.compute.remote(control, self.params, self.feeds[rank].batch_for.remote(control, rank))
            for rank, worker in enumerate(self.workers)
        ]
        metrics = self.server.apply.remote(control, *results)
        self.params = self.server.parameters.remote(control)  # runs after apply: actor calls keep their order
        self.in_flight = [*self.in_flight[-self.kept :], *results, metrics, self.params]
        return metrics

    def result(self, ref, timeout_s: float) -> dict:
        """A step's metrics; raises if the step failed or took longer than ``timeout_s``."""
        return ray.get(ref, timeout=timeout_s)

    def close(self, cancel: bool = False) -> None:
        """With ``cancel``, cancel the calls of steps still in flight: after a timeout, a call
        waiting for a stuck worker's result would hold up every later call to its actor (Ray runs
        them in submission order). Not after a crash: the lost actor's calls fail at once, while a
        cancelled call leaves a gap that its actor waits out (30 s) before going on."""
        for ref in self.in_flight if cancel else []:
            with contextlib.suppress(Exception):  # finished, or its actor is gone: nothing to cancel
                ray.cancel(ref)
        self.in_flight = []


class AsyncEngine:
    """Asynchronous mode: each worker runs its own chain (parameters -> tasks -> update -> push ->
    parameters ...), and the driver pushes each update to the server as soon as it exists, as in
    Ray's asynchronous parameter-server example. A push is submitted only once its update is ready,
    so a slow worker's push never waits in the server's queue ahead of the others' (actor calls run
    in submission order)."""

    def __init__(self, server, workers, feeds, max_inflight_steps: int, timeout_s: float):
        self.server, self.workers, self.feeds = server, workers, feeds
        self.computing: dict[ray.ObjectRef, int] = {}  # each worker's update in the making -> its position
        for position in range(len(workers)):
            self._compute(position, *server.pull.options(num_returns=2).remote())

    def _compute(self, position: int, control, params) -> None:
        tasks = self.feeds[position].next_batch.remote()
        self.computing[self.workers[position].compute.remote(control, params, tasks)] = position

    def next_update(self, timeout_s: float) -> dict:
        """Push the first worker update to be ready; returns the server's metrics for it."""
        ready, _ = ray.wait(list(self.computing), num_returns=1, timeout=timeout_s)
        if not ready:
            raise ray.exceptions.GetTimeoutError(f"no worker finished an update in {timeout_s:g} s")
        position = self.computing.pop(ready[0])
        metrics, control, params = self.server.push.options(num_returns=3).remote(ready[0])
        self._compute(position, control, params)
        return ray.get(metrics, timeout=timeout_s)

    def close(self, cancel: bool = False) -> None:
        """Abandon the updates in the making (cancelled after a timeout, as ``TaskEngine.close``)."""
        for ref in self.computing if cancel else []:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        self.computing = {}


ENGINES = {"compiled": CompiledEngine, "tasks": TaskEngine, "async": AsyncEngine}


def choose_engine(cfg) -> str:
    """The engine for ``cluster.engine`` and ``train.mode``, resolving ``auto`` (see the module docstring)."""
    cluster = cfg.cluster
    if cfg.train.mode == "async":
        return "async"
    if cluster.engine != "auto":
        return cluster.engine
    if cluster.gpus_per_worker > 0 and cluster.cpu_fallback:
        return "tasks"  # GPUs that may be fake: a compiled graph of GPU actors hung on them (cluster/local.sh)
    return "compiled" if cluster.gpus_per_worker > 0 or cluster.cpus_per_worker <= 1 else "tasks"
