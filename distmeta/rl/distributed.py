"""Meta-RL on Ray: local.py's generator, server and workers as actors, the step the same calls.
Each worker owns a share of every meta-batch's tasks (it collects their episodes and keeps them);
the server takes the meta-step by asking every worker for sums over its tasks, in parallel, one
round per question (TRPO: the gradient, each Fisher-vector product of conjugate gradient, each
line-search candidate; ProMP: each Adam step). The same step as ``LocalMetaRL``'s, whatever the
number of workers (tests/test_rl_runtime.py)."""

from __future__ import annotations

import numpy as np
import ray

from distmeta.rl.local import LearnerState, MetaRLGroup, MetaRLServer, ShareWorker, TaskStream, even_shares
from distmeta.rl.setup import MetaRLSetup
from distmeta.runtime.worker import worker_process_env


class RemoteShares:
    """The server's ``gather`` on Ray: every worker's answer to ``method``, in worker order."""

    def __init__(self, workers: list):
        self.workers = workers

    def __call__(self, method: str, *args) -> list:
        args = [ray.put(a) if isinstance(a, np.ndarray) else a for a in args]  # stored once for all workers
        return ray.get([worker.answer.remote(method, *args) for worker in self.workers])


class RayMetaRL(MetaRLGroup):
    """The actors of a run: the task generator and the server need no core of their own (their
    work is microseconds a call), each worker ``cpus_per_worker`` (its torch threads), with glibc's
    malloc tuned as the supervised workers' (``malloc_settings``)."""

    def __init__(
        self,
        setup: MetaRLSetup,
        num_workers: int,
        cpus_per_worker: float = 1,
        state: LearnerState | None = None,
        server_resource: str = "",
        malloc_settings: bool = True,
    ):
        if not 1 <= num_workers <= setup.meta_batch_size:
            raise ValueError(f"{num_workers} workers for a meta-batch of {setup.meta_batch_size}: give each a task")
        self.setup = setup
        small = {"num_cpus": 0, "resources": {server_resource: 0.001} if server_resource else None}
        self.generator = ray.remote(**small)(TaskStream).remote(setup)
        # glibc keeps what a step frees for the next (runtime/worker.py): the Fisher-vector products'
        # temporaries are megabytes, mapped and unmapped every call otherwise (0.93x the plain
        # loop on one worker without, 1.01x with: benchmarks/navigation2d.py)
        runtime_env = {"env_vars": worker_process_env()} if malloc_settings else None
        worker = ray.remote(num_cpus=cpus_per_worker, runtime_env=runtime_env)(ShareWorker)
        threads = max(1, int(cpus_per_worker))
        shares = even_shares(setup.meta_batch_size, num_workers)
        self.workers = [worker.remote(setup, tasks, threads) for tasks in shares]
        self.server = ray.remote(**small)(MetaRLServer).remote(setup, RemoteShares(self.workers), state)
        self.shares = [(share.start, share.stop) for share in shares]

    def call(self, actor, method: str, *args):
        return getattr(actor, method).remote(*args)

    def get(self, result, timeout_s: float | None = None):
        return ray.get(result, timeout=timeout_s)

    @property
    def actors(self) -> list:
        return [self.generator, self.server, *self.workers]

    def ready(self, timeout_s: float) -> list[bool]:
        """Which actors (``actors``' order) are up within ``timeout_s``. A constructor that raised
        is raised here (a re-run would fail the same way); an actor lost or not yet placed is not up."""
        pings = [actor.__ray_ready__.remote() for actor in self.actors]
        done, _ = ray.wait(pings, num_returns=len(pings), timeout=timeout_s)
        answered = []
        for ping in pings:
            try:
                answered.append(ping in done and ray.get(ping, timeout=0))
            except ray.exceptions.RayActorError as err:
                if err.actor_init_failed:
                    raise
                answered.append(False)
        return answered

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
