"""How a step travels through the actors. The synchronous engines all mean the same thing: step t's
workers use exactly the parameters after step t - 1, and the driver may submit steps ahead of
their results.

  compiled  one Ray compiled graph for the whole run: the actors exchange the step's control
            message, parameters, tasks and updates over shared-memory channels, with no per-step
            task scheduling. But Ray's channel reads busy-wait: an actor waiting for its input
            spins on a core.
  tasks     ordinary actor calls chained through object refs. Works wherever Ray does.
  auto      (default) compiled for GPU workers and single-threaded CPU workers; tasks for CPU
            workers with several threads, whose OpenMP barriers the spinning actors would stall,
            and for GPU workers allowed to fall back to the CPU (``cluster.cpu_fallback``).
            The measurements behind the choice: docs/architecture.md, "Engines".

While a compiled graph is live its actors run nothing else, so checkpoints and parameter snapshots
for evaluation ride on the step's control message instead of separate calls.

A step's topology is ``wire_step``, which the compiled and the task engine both build: ``servers`` are the parameter
server's shards (one by default, ``cluster.server_shards``); each worker reads every shard's slice
of the parameters and sends shard k its slice k of the update. A step's result is the shards'
metrics joined (``join_metrics``).

Asynchronous mode (``train.mode=async``) has no common steps, and its own engine, ``AsyncEngine``;
all-reduce mode (``cluster.reduce=allreduce``) has no server, and its own, ``AllreduceEngine``,
whose workers own the meta-optimizer and so can run several steps a call
(``cluster.steps_per_call``). Every engine is an ``Engine`` (it closes); the synchronous ones are
``StepEngine``s (the driver submits calls and reads their steps' metrics in order).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import ray
from ray.dag import InputNode, MultiOutputNode

from distmeta.config import ClusterConfig
from distmeta.runtime.control import StepControl, StepMetrics
from distmeta.runtime.parameter_server import join_metrics

PACE_ABOVE_S = 0.02  # shorter steps: sleeping costs more latency than the busy-wait costs CPU
TEARDOWN_S = 10.0  # a compiled graph's healthy actors leave their loops within this after a teardown


@dataclass(frozen=True)
class Actors:
    """The actors of one engine generation: ``feeds[i]`` is the task generator that makes the tasks
    of ``workers[i]``; ``servers`` are the parameter server's shards (none in all-reduce mode)."""

    servers: list
    workers: list
    feeds: list


def _bind(method, *args, returns: int = 1):
    """A compiled graph's node for a call of the actor method ``method``."""
    return method.options(num_returns=returns).bind(*args)


def _submit(method, *args, returns: int = 1):
    """The object ref(s) of a call of the actor method ``method``, submitted now."""
    return method.options(num_returns=returns).remote(*args)


def wire_step(actors: Actors, control, params: list, call) -> tuple[list[list], list]:
    """One synchronous step through ``actors``: each worker computes the update of its tasks at
    ``params`` (every shard's slice of the parameters) and returns it as one slice per shard; each
    shard applies its slice of every worker's. ``call`` is ``_bind`` (a compiled graph) or
    ``_submit`` (chained actor calls). Returns the workers' outputs and the shards' metrics."""
    shards = len(actors.servers)
    outputs = []
    for rank, worker in enumerate(actors.workers):
        tasks = call(actors.feeds[rank].batch_for, control, rank)
        output = call(worker.compute, control, tasks, *params, returns=shards)
        outputs.append([output] if shards == 1 else list(output))
    metrics = [call(server.apply, control, *[out[k] for out in outputs]) for k, server in enumerate(actors.servers)]
    return outputs, metrics


class Engine(ABC):
    """What the driver and the supervisor ask of every engine: it is made for one generation of
    ``actors`` and closed after it (``cancel``: after a timeout, when actors may be stuck)."""

    def __init__(self, actors: Actors, cluster: ClusterConfig):
        self.actors = actors

    @abstractmethod
    def close(self, cancel: bool = False) -> None: ...


class StepEngine(Engine):
    """A synchronous engine: the driver submits calls ahead (``submit``) and reads their metrics
    in order. A call is one step, or with ``cluster.steps_per_call`` (all-reduce mode only: the
    workers own the meta-optimizer) several consecutive steps."""

    @abstractmethod
    def submit(self, controls: list[StepControl]):
        """Start a call of the consecutive steps ``controls``; returns the handle ``result`` reads."""

    @abstractmethod
    def result(self, handle, timeout_s: float) -> list[StepMetrics]:
        """The metrics of a submitted call's steps; raises if it failed or took longer than ``timeout_s``."""


class CompiledEngine(StepEngine):
    def __init__(self, actors: Actors, cluster: ClusterConfig):
        super().__init__(actors, cluster)
        with InputNode() as control:
            params = [_bind(server.parameters, control) for server in actors.servers]
            _, metrics = wire_step(actors, control, params, _bind)
            graph = MultiOutputNode(metrics)
        self.graph = graph.experimental_compile(
            _max_inflight_executions=cluster.max_inflight_steps + 1, _submit_timeout=cluster.step_timeout_s
        )
        self.graph.actor_to_executable_tasks = RunningLoops(self.graph)

        self.step_s, self.last_result = 0.0, time.perf_counter()

    def submit(self, controls: list[StepControl]):
        (control,) = controls  # one step a call: the server applies each before the next is computed
        return self.graph.execute(control)

    def result(self, refs, timeout_s: float) -> list[StepMetrics]:
        """A step's metrics. Reading a compiled graph's output busy-waits, which would take a core
        from the workers on a small machine, so first sleep through most of the expected wait."""
        if self.step_s > PACE_ABOVE_S:
            time.sleep(max(0.0, 0.8 * (self.last_result + self.step_s - time.perf_counter())))
        metrics = join_metrics(ray.get(refs, timeout=timeout_s))
        now = time.perf_counter()
        self.step_s = 0.9 * self.step_s + 0.1 * (now - self.last_result)  # moving average of the step time
        self.last_result = now
        return [metrics]

    def close(self, cancel: bool = False) -> None:
        """Tear the graph down. After a timeout (``cancel``) an actor may be frozen: its loop never
        ends, and Ray's teardown would wait for it forever. So the teardown runs aside, and an actor
        whose loop is still running after ``TEARDOWN_S`` (or three steps, if longer: a healthy actor
        finishes the step it is in first) is killed (Ray restarts it)."""
        if not cancel:
            self.graph.teardown()
            return
        teardown = threading.Thread(target=self.graph.teardown, daemon=True)
        teardown.start()
        teardown.join(max(TEARDOWN_S, 3 * self.step_s))
        if teardown.is_alive():
            for actor, loop in self.graph.worker_task_refs.items():  # each actor's graph loop
                if not ray.wait([loop], timeout=0)[0]:
                    KILLED_BY_CLOSE.add(actor._actor_id.hex())
                    ray.kill(actor, no_restart=False)
            teardown.join(6 * TEARDOWN_S)  # then go on: recovery pings every actor anyway


class RunningLoops(dict):
    """A compiled graph's actors and their tasks, as Ray's teardown reads them to cancel each
    actor's loop: only the actors whose loop still runs. When an actor dies (a killed server, or a
    frozen worker that ``close`` killed) its loop ends with it, and Ray's monitor thread tears the
    graph down at once, sending each actor a cancel: the dead one's fails (it is restarting) and
    Ray logged a 40-line "Error cancelling worker task" traceback for a fault already recovered
    from. A cancel already on its way to an actor ``close`` kills fails the same way: Ray's report
    of that one is dropped (``MootCancels``)."""

    def __init__(self, graph):
        super().__init__(graph.actor_to_executable_tasks)
        self.loops = graph.worker_task_refs

    def _running(self, actor) -> bool:
        loop = self.loops.get(actor)
        ended = actor._actor_id.hex() in KILLED_BY_CLOSE or (loop is not None and ray.wait([loop], timeout=0)[0])
        return not ended

    def keys(self):
        return [actor for actor, _ in self.items()]

    def items(self):
        return [(actor, tasks) for actor, tasks in super().items() if self._running(actor)]


class MootCancels(logging.Filter):
    """Drops Ray's "Error cancelling worker task" for an actor that ``CompiledEngine.close`` killed
    while the cancel was on its way (see ``RunningLoops``); every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() != "Error cancelling worker task" or not record.exc_info:
            return True
        error = str(record.exc_info[1])
        return not any(actor in error for actor in list(KILLED_BY_CLOSE))


KILLED_BY_CLOSE: set[str] = set()  # ids of the actors close() killed: their loops ended with them
logging.getLogger("ray.dag.compiled_dag_node").addFilter(MootCancels())


class TaskEngine(StepEngine):
    def __init__(self, actors: Actors, cluster: ClusterConfig):
        super().__init__(actors, cluster)
        self.params = [server.parameters.remote() for server in actors.servers]
        self.in_flight: list = []  # the calls of recent steps, cancelled on close
        self.kept = (cluster.max_inflight_steps + 2) * (len(actors.workers) + 2) * len(actors.servers)

    def submit(self, controls: list[StepControl]):
        (control,) = controls  # one step a call, as CompiledEngine
        outputs, metrics = wire_step(self.actors, control, self.params, _submit)
        # after apply: actor calls keep their order
        self.params = [server.parameters.remote(control) for server in self.actors.servers]
        self.in_flight = [
            *self.in_flight[-self.kept :],
            *[ref for out in outputs for ref in out],
            *metrics,
            *self.params,
        ]
        return metrics

    def result(self, refs, timeout_s: float) -> list[StepMetrics]:
        return [join_metrics(ray.get(refs, timeout=timeout_s))]

    def close(self, cancel: bool = False) -> None:
        """With ``cancel``, cancel the calls of steps still in flight: after a timeout, a call
        waiting for a stuck worker's result would hold up every later call to its actor (Ray runs
        them in submission order). Not after a crash: the lost actor's calls fail at once, while a
        cancelled call leaves a gap that its actor waits out (5 s on our embedded Ray,
        30 s by default: see cluster.ray_system_config) before going on."""
        for ref in self.in_flight if cancel else []:
            with contextlib.suppress(Exception):  # finished, or its actor is gone: nothing to cancel
                ray.cancel(ref)
        self.in_flight = []


class AsyncEngine(Engine):
    """Asynchronous mode: each worker runs its own chain (parameters -> tasks -> update -> push ->
    parameters ...), and the driver pushes each update to the server as soon as it exists, as in
    Ray's asynchronous parameter-server example. A push is submitted only once its update is ready,
    so a slow worker's push never waits in the server's queue ahead of the others' (actor calls run
    in submission order). Every shard gets the pushes in the same order, so all take the same
    decisions on staleness."""

    def __init__(self, actors: Actors, cluster: ClusterConfig):
        super().__init__(actors, cluster)
        self.computing: dict[ray.ObjectRef, tuple[int, list]] = {}  # an update in the making -> (position, its parts)
        for position in range(len(actors.workers)):
            pulled = [_submit(server.pull, returns=2) for server in actors.servers]
            self._compute(position, pulled[0][0], [params for _, params in pulled])

    def _compute(self, position: int, control, params: list) -> None:
        shards = len(self.actors.servers)
        tasks = self.actors.feeds[position].next_batch.remote()
        output = _submit(self.actors.workers[position].compute, control, tasks, *params, returns=shards)
        parts = [output] if shards == 1 else list(output)
        self.computing[parts[0]] = (position, parts)  # a call's returns are ready together

    def next_update(self, timeout_s: float) -> StepMetrics:
        """Push the first worker update to be ready; returns the server's metrics for it."""
        ready, _ = ray.wait(list(self.computing), num_returns=1, timeout=timeout_s)
        if not ready:
            raise ray.exceptions.GetTimeoutError(f"no worker finished an update in {timeout_s:g} s")
        position, parts = self.computing.pop(ready[0])
        pushed = [_submit(server.push, part, returns=3) for server, part in zip(self.actors.servers, parts)]
        self._compute(position, pushed[0][1], [params for _, _, params in pushed])
        return join_metrics(ray.get([metrics for metrics, _, _ in pushed], timeout=timeout_s))

    def close(self, cancel: bool = False) -> None:
        """Abandon the updates in the making (cancelled after a timeout, as ``TaskEngine.close``)."""
        for ref in self.computing if cancel else []:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        self.computing = {}


class AllreduceEngine(StepEngine):
    """All-reduce mode (runtime/allreduce.py): one call per worker for each call's steps, which
    computes, sums with the others and applies, step after step; the driver reads the first
    worker's metrics."""

    def submit(self, controls: list[StepControl]):
        feeds = self.actors.feeds
        return [
            worker.steps.remote(controls, feeds[position].batches_for.remote(controls, position))
            for position, worker in enumerate(self.actors.workers)
        ]

    def result(self, refs, timeout_s: float) -> list[StepMetrics]:
        """A worker's collective fails when a peer dies: then the peer's death is raised, the fault
        behind the error."""
        try:
            # the first worker's steps, each as one shard's (its checkpoint state a list of one part)
            return [join_metrics([metrics]) for metrics in ray.get(refs, timeout=timeout_s)[0]]
        except ray.exceptions.RayTaskError as failed:
            for ref in refs:
                try:
                    ray.get(ref, timeout=timeout_s)
                except ray.exceptions.RayActorError as lost:
                    raise lost from failed
                except Exception:  # another worker's error: the one raised below says enough
                    continue
            raise

    def close(self, cancel: bool = False) -> None:
        """Nothing to cancel: after a fault every worker is started afresh (see Supervisor.start)."""


ENGINES: dict[str, type[Engine]] = {
    "compiled": CompiledEngine,
    "tasks": TaskEngine,
    "async": AsyncEngine,
    "allreduce": AllreduceEngine,
}


def choose_engine(cfg) -> str:
    """The engine for ``cluster.engine`` and ``train.mode``, resolving ``auto`` (see the module docstring)."""
    cluster = cfg.cluster
    if cfg.train.mode == "async":
        return "async"
    if cluster.reduce == "allreduce":
        return "allreduce"
    if cluster.engine != "auto":
        return cluster.engine
    if cluster.gpus_per_worker > 0 and cluster.cpu_fallback:
        return "tasks"  # GPUs that may be fake: a compiled graph of GPU actors hung on them (cluster/local.sh)
    return "compiled" if cluster.gpus_per_worker > 0 or cluster.cpus_per_worker <= 1 else "tasks"
