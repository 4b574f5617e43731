"""Connecting to Ray: an embedded local instance by default, or an existing cluster by address,
and the workers' layout on what it has (``plan_layout``). Resources are checked before any actor
is created, so a request the cluster cannot satisfy fails at once with what the cluster has,
instead of waiting forever."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
from collections.abc import Callable

import ray

from distmeta.config import AUTO, ClusterConfig, Config, ConfigError
from distmeta.data.shards import MANIFEST, ShardError
from distmeta.tasks import SOURCES

log = logging.getLogger(__name__)
ACTOR_NICENESS = 15  # what Ray gives its worker processes


def ray_system_config() -> dict:
    """The embedded Ray's settings (the tests' clusters get them too), a new dict each time: ray.init
    writes its session's spilling folder into the one it is given.

    - After a timed-out step, recovery cancels the calls still queued on healthy actors; each one
      waits for the cancelled calls' sequence numbers before it runs the next one: 5 s here, 30 s
      by Ray's default, each fault. Calls reach an actor in order, so only cancelled or lost ones
      leave a gap. A cluster of your own takes it as RAY_actor_scheduling_queue_max_reorder_wait_seconds.
    - No dashboard shows the metrics: collecting them only costs cores (after a node was lost, the
      GCS and the dashboard agent took both cores of a 2-core machine for a minute)."""
    return {"actor_scheduling_queue_max_reorder_wait_seconds": 5, "enable_metrics_collection": False}


GCS_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"
GCS_WAIT_S = 120


def allow_slow_start() -> None:
    """Give a new local Ray's GCS 120 s to come up instead of Ray's 30: on a loaded 2-core machine
    (CI, a TensorBoard starting beside it) it once took longer, and the run failed before its first
    step. A failed start only waits longer; a value the user set is left alone."""
    os.environ.setdefault(GCS_WAIT_ENV, str(GCS_WAIT_S))


class ClusterError(RuntimeError):
    pass


def connect(cluster: ClusterConfig) -> bool:
    """Start or attach to Ray; returns True if this call started an embedded instance."""
    if ray.is_initialized():
        started = False
    elif cluster.address is None:
        cores = os.cpu_count() or 1
        numbers = AUTO not in (cluster.num_workers, cluster.cpus_per_worker)
        needed = math.ceil(cluster.num_workers * cluster.cpus_per_worker) if numbers else cores
        if needed > cores:
            log.warning("%d worker CPUs requested on a %d-core machine: workers will share cores", needed, cores)
        _choose_token_auth()
        allow_slow_start()
        # address="local": a new instance even when this machine runs a `ray start` cluster (which
        # plain ray.init() would join, refusing num_cpus); --address auto joins that one
        try:
            ray.init(
                address="local",
                num_cpus=max(cores, needed),
                include_dashboard=False,
                logging_level=logging.WARNING,
                _system_config=ray_system_config(),
            )
        except Exception as err:
            # its processes did not come up in time: the GCS within GCS_WAIT_ENV's seconds, the raylet within
            # Ray's fixed 30 s (a bare Exception; seen on a 2-core machine running CI beside a training run)
            raise ClusterError(
                f"the embedded local Ray did not start: {type(err).__name__}: {str(err).splitlines()[0]}\n"
                "Nothing was trained or written. A heavily loaded machine or a full /tmp (Ray's session folder) "
                f"delays its start ({GCS_WAIT_ENV}={os.environ[GCS_WAIT_ENV]} s allowed): try again, or check "
                "`df /tmp` and the logs under /tmp/ray/session_latest/logs."
            ) from None
        started = True
        if cluster.renice_driver and hasattr(os, "nice"):
            os.nice(max(0, ACTOR_NICENESS - os.nice(0)))
    else:
        _check_reachable(cluster.address)
        try:
            ray.init(address=cluster.address, logging_level=logging.WARNING)
        except Exception as err:
            if "version mismatch" in str(err).lower():
                raise ClusterError(
                    f"the Ray cluster at {cluster.address!r} runs another Ray or Python version than this machine "
                    f"(ray {ray.__version__}): {err}\nInstall the cluster's versions here, or run from a cluster node."
                ) from None
            raise ClusterError(
                f"cannot connect to a Ray cluster at {cluster.address!r}: {err}\n"
                "Start one with `ray start --head` (it prints the address), pass --address auto on a node "
                "of the cluster, or drop --address to run on an embedded local Ray."
            ) from None
        started = False
    return started


SPLIT_ABOVE_S = 0.05  # a CPU step's compute worth splitting over workers: 10x what a worker adds per step


def plan_layout(cfg: Config, step_seconds: Callable[[], float]) -> Config:
    """``cfg`` with its layout's ``auto`` fields resolved against the connected cluster, checked
    to fit it. With GPUs, one worker per GPU. Without, one worker per CPU core, each
    single-threaded: on small convolutions torch's second thread adds far less than a second
    process does (benchmarks/peers.py), and one thread per process never stalls in OpenMP's
    barriers when cores are short. But only where a step's compute (``step_seconds()``, one
    single-threaded worker's estimate) is above ``SPLIT_ABOVE_S``: below it, coordination decides
    and one worker on one core is fastest (sinusoid MAML, 3 ms a step: 3,540 tasks/s on one worker,
    2,400 on two), the other cores left to the server, the task generator and the driver. An
    explicit ``num_workers`` with ``auto`` CPUs shares the cores among them. Auto never picks more
    workers than the run's own checks allow (one task each in a synchronous step; no more than
    ``train.max_staleness`` + 1 asynchronous ones that drop)."""
    c, t = cfg.cluster, cfg.train
    total = ray.cluster_resources()
    cores, gpus_total = int(total.get("CPU", 1)), total.get("GPU", 0.0)
    gpus = (1.0 if gpus_total >= 1 else 0.0) if c.gpus_per_worker == AUTO else c.gpus_per_worker
    workers = c.num_workers
    if workers == AUTO:
        per_worker = 1.0 if c.cpus_per_worker == AUTO else c.cpus_per_worker
        workers = int(gpus_total // gpus) if gpus else int(cores // per_worker)
        limit = t.meta_batch_size if t.mode == "sync" else t.max_staleness + 1 if t.stale_updates == "drop" else workers
        workers = max(1, min(workers, limit))
        if not gpus and workers > 1 and step_seconds() < SPLIT_ABOVE_S:
            return _placed(cfg, 1, 1.0 if c.cpus_per_worker == AUTO else c.cpus_per_worker, gpus)
    cpus = c.cpus_per_worker
    if cpus == AUTO:
        cpus = 1.0 if gpus else float(max(1, cores // workers))
    return _placed(cfg, workers, cpus, gpus)


def _placed(cfg: Config, workers: int, cpus: float, gpus: float) -> Config:
    cluster = dataclasses.replace(cfg.cluster, num_workers=workers, cpus_per_worker=cpus, gpus_per_worker=gpus)
    check_resources(cluster)
    return dataclasses.replace(cfg, cluster=cluster).validate()


def describe_layout(requested: ClusterConfig, placed: ClusterConfig) -> str:
    """The layout in words, saying which parts ``auto`` chose: "2 workers x 1 CPU (auto)"."""
    chosen = [n for n in ("num_workers", "cpus_per_worker", "gpus_per_worker") if getattr(requested, n) == AUTO]
    gpus = f" + {placed.gpus_per_worker:g} GPU" if placed.gpus_per_worker else ""
    plural = "s" if placed.num_workers != 1 else ""
    line = f"{placed.num_workers} worker{plural} x {placed.cpus_per_worker:g} CPU{gpus}"
    return line + (f" (auto: {', '.join(chosen)})" if chosen else "")


def _choose_token_auth() -> None:
    """Ray 2.60 turns token authentication on for a new local instance when RAY_AUTH_MODE is unset,
    and warns on every start that it did. The embedded instance keeps that secure default, chosen
    explicitly: RAY_AUTH_MODE=token, then Ray's config re-read (Ray caches it at import; its own
    switch to token mode does the same). A mode the user set is left alone."""
    reread = getattr(getattr(ray._raylet, "Config", None), "initialize", None)  # absent before token auth existed
    if "RAY_AUTH_MODE" not in os.environ and reread is not None:
        os.environ["RAY_AUTH_MODE"] = "token"
        reread("")


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds on a dead HOST:PORT: ray.init itself retries for minutes."""
    if address == "auto":
        return  # Ray finds the local cluster's address itself and fails at once if there is none
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ClusterError(
            f"nothing answers at {address!r} ({err}). Check the head node's address and port "
            "(`ray status` on the head node shows it; the default GCS port is 6379, Ray Client's is 10001), "
            "or drop --address to run on an embedded local Ray."
        ) from None


def check_resources(cluster: ClusterConfig) -> None:
    total = ray.cluster_resources()
    if cluster.server_resource and total.get(cluster.server_resource, 0.0) <= 0:
        raise ConfigError(
            f"cluster.server_resource={cluster.server_resource!r}, but no node of the Ray cluster has that resource "
            f'(resources: {_describe(total)}). Start the head node with --resources=\'{{"{cluster.server_resource}": '
            "1000}' (cluster/local.sh and the configs in cluster/ do), or leave cluster.server_resource empty"
        )
    for resource, per_worker in (("GPU", cluster.gpus_per_worker), ("CPU", cluster.cpus_per_worker)):
        needed = cluster.num_workers * per_worker
        have = total.get(resource, 0.0)
        if needed > have + 1e-9:
            raise ConfigError(
                f"{cluster.num_workers} workers x {per_worker:g} {resource} = {needed:g} {resource}s, but the Ray "
                f"cluster has {have:g} (resources: {_describe(total)}). Lower cluster.num_workers or "
                f"cluster.{resource.lower()}s_per_worker, or add nodes."
            )


def check_data_where_actors_run(cfg: Config, actors: dict[str, ray.actor.ActorHandle], timeout_s: float) -> None:
    """The run's data, checked in ``actors`` (a name for the error, ``worker 0``, -> an actor on a
    node to check) before any step: the final evaluation reads the shards on the workers' nodes, in
    processes of their own, and on a cluster started with `ray start` those run in the folder the
    command ran in, not the driver's, so a relative ``task.shards`` may name nothing there, or other
    data. Unchecked, the run would train to its end and fail there. (The driver checked its own
    node, where validations run; a task generator without the data fails at its construction.)"""
    source = SOURCES[cfg.task.source]
    if not source.fingerprinted:
        return

    def check_here(_actor) -> str:  # runs in the actor: "" when the data there is the run's
        where = os.path.abspath(cfg.task.shards)
        try:
            found, expected = source.data_fingerprint(cfg.task), cfg.task.shards_fingerprint  # train() records it
            problem = (
                "" if found == expected else f"other data at {where} ({found[:12]}..., the run's {expected[:12]}...)"
            )
        except (ConfigError, ShardError, OSError) as err:
            problem = f"no shards at {where}" if not os.path.isfile(os.path.join(where, MANIFEST)) else str(err)
        node = ray.get_runtime_context().get_node_id()[:8]
        return problem and f"on node {ray.util.get_node_ip_address()} ({node}), working folder {os.getcwd()}: {problem}"

    try:
        answers = ray.get([actor.__ray_call__.remote(check_here) for actor in actors.values()], timeout=timeout_s)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
        raise ClusterError(f"the check of the run's data on its workers' nodes got no answer: {err}") from None
    where: dict[str, list[str]] = {}  # a problem -> the actors that have it (one line per node)
    for name, answer in zip(actors, answers):
        if answer:
            where.setdefault(answer, []).append(name)
    if not where:
        return
    problems = "; ".join(f"{', '.join(names)}: {problem}" for problem, names in where.items())
    relative = (
        f" task.shards={cfg.task.shards} is relative: the driver read it in {os.getcwd()}, and each Ray process "
        "reads it in its own working folder (on a cluster started with `ray start`, the folder that command ran in)."
    )
    raise ConfigError(
        f"the run's shards are not on its workers' nodes, where its final evaluation reads them. {problems}."
        + ("" if os.path.isabs(cfg.task.shards) else relative)
        + " Give task.shards an absolute path that holds the same shards on every node, or a volume every node mounts"
    )


def _describe(resources: dict) -> str:
    keys = [k for k in ("CPU", "GPU", "memory") if k in resources]
    return ", ".join(
        f"{k}={resources[k]:g}" if k != "memory" else f"memory={resources[k] / 2**30:.1f}GiB" for k in keys
    )
