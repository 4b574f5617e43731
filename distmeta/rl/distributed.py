"""Meta-RL on Ray: each worker actor owns a share of every meta-batch's tasks (it collects their
episodes and keeps them), the driver's learner takes the meta-step by asking every worker for sums
over its tasks, in parallel, one round per question (TRPO: the gradient, each Fisher-vector product
of conjugate gradient, each line-search candidate; ProMP: each Adam step). The same step as
``LocalMetaRL``'s, whatever the number of workers (tests/test_rl_runtime.py)."""

from __future__ import annotations

import ray
import torch

from distmeta.rl.envs.base import Environment
from distmeta.rl.local import MetaRLLoop, MetaRLSetup, ShareWorker, even_shares
from distmeta.rl.maml_trpo import MamlTrpoConfig
from distmeta.rl.promp import ProMPConfig


class RayMetaRL(MetaRLLoop):
    def __init__(
        self,
        env: str | type[Environment],
        cfg: MamlTrpoConfig | ProMPConfig,
        meta_batch_size: int,
        num_workers: int,
        hidden: tuple[int, ...] = (64, 64),
        activation: str = "tanh",
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        cpus_per_worker: float = 1,
    ):
        if not 1 <= num_workers <= meta_batch_size:
            raise ValueError(f"{num_workers} workers for a meta-batch of {meta_batch_size}: give each a task at least")
        setup = MetaRLSetup(env, cfg, meta_batch_size, hidden, activation, seed, dtype)
        actor = ray.remote(num_cpus=cpus_per_worker)(ShareWorker)
        self.workers = [actor.remote(setup, tasks) for tasks in even_shares(meta_batch_size, num_workers)]
        super().__init__(setup, self._call)

    def _call(self, method: str, *args) -> list:
        return ray.get([getattr(worker, method).remote(*args) for worker in self.workers])

    def close(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
