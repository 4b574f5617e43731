"""The ``threads`` implementation: a batch's tasks split over the CPU cores, one Python thread and
one torch thread per core, each running the ``loop`` on its contiguous share.

On small convolutions torch's second intra-op thread adds far less than a second core could:
OpenMP forks and joins at every operator, and a Conv4 task's operators are a few hundred
microseconds each. Tasks are independent, so giving each core whole tasks wastes nothing, which
is why the system runs one single-threaded worker per core. This does the same inside one process:
torch releases the GIL in its kernels and its CPU autograd runs backward on the calling thread, so
the threads overlap all but their Python. Measured on a 2-core Zen 5 VM against the plain per-task
loop on both cores, second-order MAML: strided Conv4 5-way 1-shot 1.25x, 20-way 1-shot with 5
inner steps 1.22x, max-pool Conv4 1.08x; it loses where a task's convolutions are large enough for
two OpenMP threads to pay (mini-ImageNet, 0.85x) or a task is so cheap that the threads' Python
serialises on the GIL (first-order MAML, 0.91x): ``auto`` times it against the others
(docs/benchmarks.md).

The math is the loop's: each task's computation is the same code; only the order in which the
tasks' updates are summed differs (each thread's share, then the shares in order), so the result
equals the loop's up to float round-off and is the same on every run with the same thread count.
Each thread has its own copy of the algorithm because ``functional_call`` swaps a module's
parameters in place for the call.
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import torch

from distmeta.tasks.batch import TaskTensors


class TaskThreads:
    """``count`` threads, each with its own copy of one algorithm."""

    def __init__(self, algorithm, count: int):
        self.count = count
        self.replicas = [copy.deepcopy(algorithm) for _ in range(count)]
        self.pool = ThreadPoolExecutor(count, thread_name_prefix="distmeta-tasks")

    def batch_sums(self, params, tasks: TaskTensors, score_before: bool):
        """The loop's ``batch_sums`` of ``tasks``, their contiguous shares on the threads at once."""
        num_tasks = len(tasks.support_x)
        shares = [(k * num_tasks // self.count, (k + 1) * num_tasks // self.count) for k in range(self.count)]
        shares = [(lo, hi) for lo, hi in shares if hi > lo]
        # grad mode and autocast are per thread: each share runs under the caller's
        grad = torch.is_grad_enabled()
        autocast = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

        def share(k: int):
            lo, hi = shares[k]
            torch.set_num_threads(1)  # OpenMP's thread count is per thread: a new one starts at all cores
            with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=autocast[1], enabled=autocast[0]):
                chunk = TaskTensors(*(t[lo:hi] for t in tasks))
                return self.replicas[k].batch_sums(params, chunk, "loop", score_before)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # also the process-wide settings (MKL's) while the shares run
        try:
            results = list(self.pool.map(share, range(len(shares))))
        finally:
            torch.set_num_threads(threads)
        update, metrics = results[0]
        for more_update, more_metrics in results[1:]:
            update = {n: value + more_update[n] for n, value in update.items()}
            metrics = {n: value + more_metrics[n] for n, value in metrics.items()}
        return update, metrics
