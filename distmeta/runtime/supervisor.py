"""The run's actors, and how the run survives losing them.

The supervisor creates the parameter server (its shards), the workers and the task generators, and
wires them into an engine. On a fault (``is_fault``: an actor, node or object lost, or a timeout)
``recover`` restores a working set of actors (a restarted server reloads its newest checkpoint; a
worker that does not answer within ``rejoin_timeout_s`` leaves the split until it is back) and
rebuilds the engine at the server's step; in all-reduce mode every worker starts afresh in a new
process group from the newest checkpoint (runtime/allreduce.py). Errors in the code or the data (a
bad shard, a bug) are not faults: they stop the run. What each fault costs, and the test that shows
it: docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import time

import ray
import ray.exceptions as rex
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from distmeta.checkpoint import CheckpointError
from distmeta.config import Config, ConfigError
from distmeta.data.shards import ShardError
from distmeta.models import DataSpec
from distmeta.params import shard_bounds
from distmeta.runtime.allreduce import Group
from distmeta.runtime.control import MetaOptimizerStatus
from distmeta.runtime.engine import ENGINES, Actors, Engine, choose_engine
from distmeta.runtime.meta_optimizer import checkpoint_state
from distmeta.runtime.parameter_server import ParameterServer
from distmeta.runtime.task_generator import BadTaskData, TaskGenerator, generator_blocks, split_evenly
from distmeta.runtime.worker import Worker, worker_process_env

log = logging.getLogger(__name__)

# Infrastructure failures: an actor, node or object lost, or a step that timed out.
FAULTS = (rex.RayActorError, rex.ObjectLostError, rex.OwnerDiedError, rex.NodeDiedError, rex.WorkerCrashedError)
TIMEOUTS = (rex.GetTimeoutError, rex.RayChannelError)
MAX_RETRIES_OF_ONE_STEP = 5
PLACEMENT_REPORT_S = 15.0  # while the workers' placement group is pending, say so this often
KILL_GRACE_S = 5.0  # a killed worker still there after this is frozen: it is SIGKILLed (see Supervisor._kill)


# errors whose message is the whole story: bad input, not a bug to trace (see actor_traceback)
BAD_INPUT = (ConfigError, ShardError, CheckpointError, BadTaskData)


class ActorLost(RuntimeError):
    """The run cannot go on without an actor it lost; the message names which."""


class ActorFailed(ActorLost):
    """An actor's call raised (bad data, a shard changed under the run, a bug): not a fault, since
    a re-run would fail the same way. The message is the original error's type and message."""


def is_fault(err: BaseException) -> bool:
    """True for a lost actor, node or object, or a timeout; False for an error raised by our code."""
    while isinstance(err, rex.RayTaskError) and not isinstance(err, FAULTS):
        cause = getattr(err, "cause", None)
        if cause is None or cause is err:
            return False
        err = cause
    return isinstance(err, FAULTS + TIMEOUTS)


class Supervisor:
    def __init__(
        self,
        cfg: Config,
        initial_params,
        checkpoints: str,
        placed: Config | None = None,
        data: tuple[DataSpec, str] | None = None,
    ):
        """``placed``: ``cfg`` with its layout resolved (``cluster.plan_layout``); the workers get it.
        ``data``: the task source's spec and kind, for the workers (else each makes the source)."""
        self.cfg, self.placed = cfg, placed or cfg
        c = self.placed.cluster
        restarts = {"max_restarts": c.actor_restarts}
        # The server and the generators need no core of their own, only (optionally) a place.
        self.service = {"num_cpus": 0, "resources": {c.server_resource: 0.001} if c.server_resource else {}}
        try:
            shards = shard_bounds(len(initial_params), c.server_shards)
        except ValueError as err:
            raise ConfigError(f"cluster.server_shards={c.server_shards}: {err}") from None
        allreduce = c.reduce == "allreduce"  # no servers: the workers keep copies (runtime/allreduce.py)
        # The servers get their initial parameters with begin_generation, not as a constructor argument:
        # one above Ray's inline limit (any image model's) lives in the object store, where Ray
        # frees it once the actor is created, so a restarted server could not be constructed again.
        self.initial, self.checkpoints = ray.put(initial_params), checkpoints
        self.servers = [
            ray.remote(ParameterServer)
            .options(**self.service, **restarts)
            .remote(cfg, len(initial_params), checkpoints, bounds)
            for bounds in ([] if allreduce else shards)
        ]
        self.placement = reserve_workers(c)
        malloc_env = {} if c.gpus_per_worker else {"runtime_env": {"env_vars": worker_process_env()}}
        self.workers = [
            ray.remote(Worker)
            .options(
                num_cpus=c.cpus_per_worker,
                num_gpus=c.gpus_per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=rank),
                **malloc_env,
                **restarts,
            )
            .remote(self.placed, rank, None, data)
            for rank in range(c.num_workers)
        ]
        self.group = Group(self.workers, c) if allreduce else None  # all-reduce mode's process group
        self.live = list(range(c.num_workers))  # ranks in the current split
        self.away: dict[int, ray.ObjectRef] = {}  # ranks out of it, each with a ping that answers when it is back
        self.generators: list = []
        self.engine_name = choose_engine(self.placed)
        self.engine: Engine | None = None
        self.shares: list[int] = []
        self.recoveries = 0
        self.generation = 0  # engine generations started; steps carry theirs (see ParameterServer.begin_generation)
        self.failed_step, self.failures_of_step = -1, 0

    def start(self) -> int:
        """Wire the live workers into a new engine at the server's step; returns that step."""
        c, t = self.cfg.cluster, self.cfg.train
        self.generation += 1
        step = self._form_group() if self.group else self._begin_generation()
        blocks = generator_blocks(len(self.live), c.num_task_generators)
        for generator in self.generators:
            ray.kill(generator)
        if t.mode == "async":  # every worker takes whole meta-batches from one stream, dealt out in turn
            self.shares = [t.meta_batch_size] * len(self.live)
            next_draw = ray.get(self.servers[0].status.remote(), timeout=c.step_timeout_s).next_draw
            self.generators = [
                ray.remote(TaskGenerator)
                .options(**self.service)
                .remote(self.cfg, [t.meta_batch_size], [0], start_draw=next_draw + g, stride=len(blocks))
                for g in range(len(blocks))
            ]
        else:  # step t takes draw t: the generators start at the step
            self.shares = split_evenly(t.meta_batch_size, len(self.live))
            self.generators = [
                ray.remote(TaskGenerator).options(**self.service).remote(self.cfg, self.shares, positions, step)
                for positions in blocks
            ]
        feeds = [generator for generator, positions in zip(self.generators, blocks) for _ in positions]
        workers = [self.workers[rank] for rank in self.live]
        self.engine = ENGINES[self.engine_name](Actors(self.servers, workers, feeds), c)
        return step

    def _begin_generation(self) -> int:
        """Tell the server shards the new engine generation; returns the step they are at."""
        timeout = self.cfg.cluster.step_timeout_s
        begun = [server.begin_generation.remote(self.generation, [self.initial]) for server in self.servers]
        steps = ray.get(begun, timeout=timeout)
        if len(set(steps)) > 1:  # a shard was restarted from the checkpoint: all go back to it
            log.warning("parameter-server shards at steps %s: all reload the newest checkpoint", steps)
            steps = ray.get([server.reload.remote() for server in self.servers], timeout=timeout)
            if len(set(steps)) > 1:
                raise ActorLost(f"parameter-server shards disagree after reloading the checkpoint: steps {steps}")
        return steps[0]

    def _form_group(self) -> int:
        """All-reduce mode: a new process group of the live workers, each in a process that was
        in no group before (an earlier member is restarted), all from the newest checkpoint.
        Returns the step they start at."""
        for rank in self._restart(self.group.joined(self.live)):
            self._leave_out(rank)
        if not self.live:
            c = self.cfg.cluster
            raise ActorLost(f"no worker came back within cluster.rejoin_timeout_s={c.rejoin_timeout_s:g} s")
        return self.group.form(self.live, self.initial, self.checkpoints, self.generation)

    def _restart(self, ranks: list[int]) -> list[int]:
        """Kill the workers ``ranks`` and wait up to ``rejoin_timeout_s`` for each to answer from a
        new process; returns those that did not."""
        pending = {}
        for rank in ranks:
            grouped = self.group.leave(rank) if self.group else None
            pending[rank] = self._kill(rank) or grouped
        deadline = time.time() + self.cfg.cluster.rejoin_timeout_s
        while pending and time.time() < deadline:
            for rank, old in list(pending.items()):
                with contextlib.suppress(rex.RayActorError, rex.GetTimeoutError):  # still restarting
                    if ray.get(self.workers[rank].__ray_call__.remote(_pid), timeout=1.0) != old:
                        del pending[rank]
            time.sleep(0.2 if pending else 0)
        return list(pending)

    def _kill(self, rank: int) -> int | None:
        """Kill worker ``rank``'s process (Ray restarts it); returns its pid, if Ray knows it.
        Ray asks the process to exit and SIGKILLs it only if the request hangs: one frozen long
        enough (SIGSTOP, swapped out) fails the request at once, so Ray leaves it alive, holding
        its placement-group bundle, and the restarted worker is never placed. A task on its node
        kills it then."""
        actor = self.workers[rank]
        info = _actor_info(actor)
        ray.kill(actor, no_restart=False)
        if info is None or info["State"] != "ALIVE" or not info["Pid"]:
            return None
        on_its_node = NodeAffinitySchedulingStrategy(info["Address"]["NodeID"], soft=False)
        _end_process.options(num_cpus=0, scheduling_strategy=on_its_node).remote(info["Pid"], KILL_GRACE_S)
        return info["Pid"]

    def _leave_out(self, rank: int) -> None:
        """Take worker ``rank`` out of the split until it answers again (it is restarted)."""
        log.warning("worker %d is not back after %.0f s: going on without it", rank, self.cfg.cluster.rejoin_timeout_s)
        self._kill(rank)
        self.away[rank] = self.workers[rank].__ray_ready__.remote()
        self.live = [r for r in self.live if r != rank]

    def status(self) -> MetaOptimizerStatus:
        """Where the meta-optimizer stands (the run reads the first server's, or first replica's)."""
        if self.group:
            return self.group.first_copy(self.live, "replica_status")
        return ray.get(self.servers[0].status.remote(), timeout=self.cfg.cluster.step_timeout_s)

    def rejoin_ready(self) -> bool:
        """True if a worker that left the split is back (the caller drains its steps and restarts)."""
        if not self.away:
            return False
        back, _ = ray.wait(list(self.away.values()), num_returns=len(self.away), timeout=0)
        returned = []
        for rank, ping in list(self.away.items()):
            if ping in back and _answered(ping):
                returned.append(rank)
            elif ping in back:  # it failed (still restarting): ask again
                self.away[rank] = self.workers[rank].__ray_ready__.remote()
        for rank in returned:
            del self.away[rank]
        self.live = sorted(self.live + returned)
        for rank in returned:
            log.warning("worker %d is back: re-splitting the meta-batch over %d workers", rank, len(self.live))
        return bool(returned)

    def recover(self, err: BaseException, step: int) -> int:
        """After a fault at ``step``: restore a working set of actors, rebuild the engine, and return
        the step to continue from (the server's). Raises ``ActorLost`` if that is impossible."""
        c = self.cfg.cluster
        if (isinstance(err, rex.RayTaskError) and not is_fault(err)) or getattr(err, "actor_init_failed", False):
            raise ActorFailed(f"training stopped at step {step}: {explain(err)}{actor_traceback(err)}") from err
        if c.actor_restarts == 0 or not is_fault(err):
            raise err
        self.failures_of_step = self.failures_of_step + 1 if step == self.failed_step else 1
        self.failed_step = step
        if self.failures_of_step > MAX_RETRIES_OF_ONE_STEP:
            raise ActorLost(f"step {step} failed {MAX_RETRIES_OF_ONE_STEP} times in a row; last error: {err}") from err
        self.recoveries += 1
        log.warning("fault at step %d (%s); recovering", step, _first_line(err))
        self.close(cancel=isinstance(err, TIMEOUTS))
        try:  # nothing goes on without the server; a restarted one reloads its checkpoint first
            for server in self.servers:
                _wait_ready(server, c.rejoin_timeout_s + c.step_timeout_s)
        except (rex.RayActorError, rex.GetTimeoutError) as lost:
            raise ActorLost(f"the parameter server did not come back after a fault ({explain(lost)})") from err
        # Workers: a killed one answers once restarted; a healthy one may first sit out calls of the
        # dropped steps that can never run (see _wait_ready). One that does not answer in time is
        # stuck or its node is gone: it is restarted and left out of the split until it answers.
        # All-reduce: the others may wait in a collective for the lost one; all start afresh.
        if self.group:
            lost = self._restart(list(self.live))
        else:
            answered = _ping_until([self.workers[rank] for rank in self.live], time.time() + c.rejoin_timeout_s)
            lost = [rank for rank, ok in zip(self.live, answered) if not ok]
            if lost == self.live:  # the split cannot go on without them: wait for them restarted
                lost = self._restart(lost)
        for rank in lost:
            self._leave_out(rank)
        if not self.live:
            raise ActorLost(
                f"no worker came back within cluster.rejoin_timeout_s={c.rejoin_timeout_s:g} s after a fault "
                f"({_first_line(err)}); check the cluster's nodes (`ray status`), then resume with --resume latest"
            ) from err
        return self.start()

    def close(self, cancel: bool = False) -> None:
        if self.engine is not None:
            try:
                self.engine.close(cancel)
            except Exception as err:  # a graph with a dead actor may not tear down cleanly
                log.info("engine teardown: %s", _first_line(err))
            self.engine = None

    def kill_all(self) -> None:
        for actor in [*self.servers, *self.workers, *self.generators]:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.placement)

    def where(self) -> dict:
        """Where the actors run: node, address and device of each worker, node of the server. Also
        the first place a worker that cannot start (say, a GPU torch cannot see) says why."""

        def place(actor, with_device: bool = False) -> dict:
            def report(instance) -> dict:
                context = ray.get_runtime_context()
                found = {"node_id": context.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid()}
                return found | ({"device": str(instance.device)} if with_device else {})

            return actor.__ray_call__.remote(report)

        c = self.cfg.cluster
        try:
            workers = ray.get([place(w, True) for w in self.workers], timeout=c.rejoin_timeout_s + c.step_timeout_s)
            servers = ray.get([place(server) for server in self.servers], timeout=c.step_timeout_s)
        except rex.RayActorError as err:
            raise ActorLost(f"an actor could not start: {explain(err)}") from None
        workers = [{"rank": rank} | w for rank, w in enumerate(workers)]
        return {"server": servers[0] if servers else None, "server_shards": servers, "workers": workers}

    def data_readers(self) -> dict:
        """The workers by name, one on each node where the final evaluation reads the run's data."""
        return {f"worker {rank}": worker for rank, worker in enumerate(self.workers)}

    def checkpoint_state(self) -> dict:
        """The run's state now, as one checkpoint (from every shard, or the first worker's copy)."""
        if self.group:
            return checkpoint_state(self.cfg, [self.group.first_copy(self.live, "replica_state")])
        parts = ray.get([server.state.remote() for server in self.servers], timeout=self.cfg.cluster.step_timeout_s)
        return checkpoint_state(self.cfg, parts)


def reserve_workers(cluster) -> PlacementGroup:
    """One bundle {CPU, GPU} per worker, placed by ``cluster.placement``. Waits (saying so) up to
    ``placement_timeout_s`` for the cluster or its autoscaler, then fails with what the nodes have."""
    bundle = {"CPU": cluster.cpus_per_worker} | ({"GPU": cluster.gpus_per_worker} if cluster.gpus_per_worker else {})
    group = placement_group([bundle] * cluster.num_workers, strategy=cluster.placement.upper())
    wanted = f"{cluster.num_workers} workers of {bundle} with cluster.placement={cluster.placement}"
    deadline = time.time() + cluster.placement_timeout_s
    ready = group.ready()
    while not ray.wait([ready], timeout=min(PLACEMENT_REPORT_S, max(0.0, deadline - time.time())))[0]:
        if time.time() >= deadline:
            remove_placement_group(group)
            nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
            raise ActorLost(
                f"Ray could not place {wanted} in {cluster.placement_timeout_s:g} s; the cluster's nodes have "
                + "; ".join(", ".join(f"{k}={v:g}" for k, v in r.items() if k in ("CPU", "GPU")) for r in nodes)
                + " (in use or free: `ray status`). Use fewer or smaller workers, add nodes, or relax "
                "cluster.placement (strict_spread needs a node per worker, strict_pack one node for all)"
            )
        print(f"waiting for the cluster to place {wanted} (`ray status` shows what is pending)", flush=True)
    return group


def _pid(actor) -> int:
    return os.getpid()


def _actor_info(actor) -> dict | None:
    """The GCS's record of ``actor`` (state, pid, node), or None if it cannot be read; it needs no
    dashboard, unlike ray.util.state."""
    try:
        return ray._private.state.actors(actor_id=actor._actor_id.hex())
    except Exception as err:  # best-effort: the caller kills the actor with ray.kill regardless
        log.info("no actor-table entry for %s: %s", actor, _first_line(err))
        return None


@ray.remote(max_retries=0)
def _end_process(pid: int, grace_s: float) -> None:
    """SIGKILL process ``pid`` if it has not exited within ``grace_s`` (the time Ray gives it)."""
    deadline = time.time() + grace_s
    with contextlib.suppress(ProcessLookupError):
        while time.time() < deadline:
            os.kill(pid, 0)
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)


def explain(err: BaseException) -> str:
    """What went wrong in an actor: the original error's type and whole message, without Ray's
    wrapper and traceback (a call's error, or the error that killed an actor's constructor)."""
    while isinstance(err, rex.RayTaskError) and isinstance(getattr(err, "cause", None), BaseException):
        if err.cause is err:
            break
        err = err.cause
    if isinstance(err, rex.RayActorError) and err.actor_init_failed:
        return _creation_error(str(err))
    if isinstance(err, rex.RayActorError):
        return _first_line(err)
    return f"{type(err).__name__}: {err}"


def actor_traceback(err: BaseException) -> str:
    """The traceback of an error an actor's call raised, as Ray recorded it there, to follow the
    error's message: a bug (in an algorithm, say) is found from where it happened. Empty for bad
    input (a config, a shard, a checkpoint), whose message names the problem and the fix."""
    if not isinstance(err, rex.RayTaskError):
        return ""
    cause = err
    while isinstance(cause, rex.RayTaskError) and isinstance(getattr(cause, "cause", None), BaseException):
        if cause.cause is cause:
            break
        cause = cause.cause
    if isinstance(cause, BAD_INPUT):
        return ""
    recorded = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).rstrip()  # Ray's text: the call, then its traceback
    return f"\n\nwhere the actor raised it:\n{recorded}"


def _creation_error(text: str) -> str:
    """The exception at the end of the constructor's traceback in a RayActorError's message, as
    ``Type: message`` (all its lines); Ray keeps only that text, not the exception."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    if not frames:
        return lines[0] if lines else "the actor's constructor failed"
    rest = lines[frames[-1] + 1 :]
    while rest and (rest[0].startswith(" ") or not rest[0]):  # the frame's source line and ^^^ marks
        rest = rest[1:]
    kind, _, message = "\n".join(rest).partition(": ")
    return f"{kind.rsplit('.', 1)[-1]} in the actor's constructor: {message}" if message else "\n".join(rest)


def _wait_ready(actor, timeout_s: float) -> None:
    """Wait until ``actor`` answers. "Unavailable" is temporary: the actor is restarting, or it is
    skipping calls that were cancelled after it had been sent later ones (Ray makes it wait for a
    call that will never come, 5 s here: ``cluster.ray_system_config``, then drops the queue)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=max(0.1, deadline - time.time()))
            return
        except rex.ActorUnavailableError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def _ping_until(actors: list, deadline: float) -> list[bool]:
    """Which of ``actors`` answered by ``deadline``, asking again those that report being unavailable."""
    pings = {i: actor.__ray_ready__.remote() for i, actor in enumerate(actors)}
    answered = [False] * len(actors)
    while pings and time.time() < deadline:
        done, _ = ray.wait(list(pings.values()), num_returns=1, timeout=max(0.0, deadline - time.time()))
        for i, ping in list(pings.items()):
            if ping in done:
                del pings[i]
                if _answered(ping):
                    answered[i] = True
                else:  # unavailable (restarting, or dropping dead calls): ask again shortly
                    time.sleep(0.2)
                    pings[i] = actors[i].__ray_ready__.remote()
    return answered


def _answered(ping: ray.ObjectRef) -> bool:
    try:
        ray.get(ping, timeout=0)
        return True
    except (rex.RayActorError, rex.GetTimeoutError):
        return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
