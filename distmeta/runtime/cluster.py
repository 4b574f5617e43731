"""Connecting to Ray: an embedded local instance by default, or an existing cluster by address.
Resources are checked before any actor is created, so a request the cluster cannot satisfy fails
at once with what the cluster has, instead of waiting forever."""

from __future__ import annotations

import logging
import math
import os
import socket

import ray

from distmeta.config import ClusterConfig, ConfigError

log = logging.getLogger(__name__)
ACTOR_NICENESS = 15  # what Ray gives its worker processes


class ClusterError(RuntimeError):
    pass


def connect(cluster: ClusterConfig) -> bool:
    """Start or attach to Ray; returns True if this call started an embedded instance."""
    if ray.is_initialized():
        started = False
    elif cluster.address is None:
        needed = math.ceil(cluster.num_workers * cluster.cpus_per_worker)
        cores = os.cpu_count() or 1
        if needed > cores:
            log.warning("%d worker CPUs requested on a %d-core machine: workers will share cores", needed, cores)
        _choose_token_auth()
        # address="local": a new instance even when this machine runs a `ray start` cluster (which
        # plain ray.init() would join, refusing num_cpus); --address auto joins that one
        try:
            ray.init(
                address="local", num_cpus=max(cores, needed), include_dashboard=False, logging_level=logging.WARNING
            )
        except (RuntimeError, ConnectionError, TimeoutError) as err:  # its processes did not come up in time
            raise ClusterError(
                f"the embedded local Ray did not start: {type(err).__name__}: {str(err).splitlines()[0]}\n"
                "Nothing was trained or written. A heavily loaded machine or a full /tmp (Ray's session folder) "
                "delays its start: try again, or check `df /tmp` and the logs under /tmp/ray/session_latest/logs."
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
    check_resources(cluster)
    return started


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


def _describe(resources: dict) -> str:
    keys = [k for k in ("CPU", "GPU", "memory") if k in resources]
    return ", ".join(
        f"{k}={resources[k]:g}" if k != "memory" else f"memory={resources[k] / 2**30:.1f}GiB" for k in keys
    )
