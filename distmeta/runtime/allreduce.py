"""All-reduce mode (``cluster.reduce=allreduce``): no parameter server between the workers.

Each worker keeps its own copy of the meta-parameters and the meta-optimizer: a ``ParameterServer``
object in its own process, so the update math is the server's. A step: every worker computes the
update of its share of the meta-batch, the workers sum their updates with ``torch.distributed``
(gloo on CPU; NCCL on GPU, which every CUDA build of torch carries), and each takes the same
optimizer step on the same sum, so the copies stay identical. The first worker of a group picks
where the group meets (its node's address and a free port, ``meeting_point``). Each worker sends
and receives about twice the update per step (a ring) however many workers there are, where one
server receives every worker's update and sends every worker the parameters.

A process group cannot lose or gain a member (and a survivor of a lost NCCL peer cannot be trusted
to tear its group down). After a fault, and when a worker rejoins, every worker is started afresh
and the group formed again from the newest checkpoint: the steps since are re-run (with the same
results). Rank 0's copy is the one checkpointed and evaluated.
"""

from __future__ import annotations

import dataclasses
import socket
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from distmeta.config import Config
from distmeta.runtime.control import Rejection, StepControl, StepMetrics, WorkerTiming, WorkerUpdate
from distmeta.runtime.parameter_server import ParameterServer


def meeting_point() -> str:
    """HOST:PORT on this node where a new process group can meet (the port is free now)."""
    import ray  # here, not above: a Worker runs without Ray too (in-process evaluation, benchmarks)

    with socket.socket() as probe:
        probe.bind(("", 0))
        return f"{ray.util.get_node_ip_address()}:{probe.getsockname()[1]}"


class Replica:
    """A worker's copy of the meta-parameters and meta-optimizer, and its place in the process
    group of the workers ``ranks`` (in group order) that meets at ``address`` (``meeting_point``
    of the first)."""

    def __init__(
        self, cfg: Config, initial: np.ndarray, checkpoints: str, address: str, ranks: list[int], rank: int, device
    ):
        self.ranks, self.position, self.device = ranks, ranks.index(rank), device
        self.server = ParameterServer(cfg, initial, checkpoints)  # from the newest checkpoint, if any
        cuda = device.type == "cuda"
        if cuda and not dist.is_nccl_available():
            raise RuntimeError(
                "cluster.reduce=allreduce on GPUs sums over NCCL, which this build of torch lacks: "
                "install a CUDA build of torch on Linux, or use cluster.reduce=server"
            )
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"tcp://{address}",
            world_size=len(ranks),
            rank=self.position,
            timeout=timedelta(seconds=cfg.cluster.step_timeout_s),  # a peer that never comes fails the step
            device_id=device if cuda else None,
        )

    def apply(self, control: StepControl, result: WorkerUpdate) -> StepMetrics:
        """Sum this worker's ``result`` with the others' and take the step. Returns the step's
        metrics, with the parameters or the checkpoint state only from the first worker (the one
        the driver reads). The sum goes into ``result``'s update (on the CPU): no copy of it per step."""
        names = list(result.metrics)
        total = torch.from_numpy(result.update).to(self.device)
        # The small numbers travel in one float64 vector: the metric sums, then a row per worker
        # (non-finite?, first task, task count, times); each fills its own row, the sum gathers them.
        timing = result.timing
        rows = np.zeros((len(self.ranks), 6))
        rows[self.position] = [
            not result.finite,
            result.first_task,
            timing.num_tasks,
            timing.produced_at,
            timing.started,
            timing.finished,
        ]
        small = torch.from_numpy(np.concatenate([[result.metrics[name] for name in names], rows.ravel()]))
        small = small.to(self.device)
        dist.all_reduce(total)
        dist.all_reduce(small)
        small = small.cpu()
        sums, rows = small[: len(names)].tolist(), small[len(names) :].numpy().reshape(len(self.ranks), -1)
        summed = dataclasses.replace(
            result,
            update=total.cpu().numpy(),
            finite=not rows[:, 0].any(),
            metrics=dict(zip(names, sums)),
            timing=dataclasses.replace(timing, num_tasks=int(rows[:, 2].sum())),
        )
        metrics = self.server.apply(control, summed)
        metrics.workers = [WorkerTiming(rank, int(row[2]), *row[3:].tolist()) for rank, row in zip(self.ranks, rows)]
        if metrics.rejected:  # name the workers that sent non-finite updates (all: finite ones overflowed)
            flagged = [(rank, row) for rank, row in zip(self.ranks, rows) if row[0]] or list(zip(self.ranks, rows))
            metrics.rejected = [Rejection(rank, (int(row[1]), int(row[1] + row[2]))) for rank, row in flagged]
        if self.position:
            metrics.params = metrics.state = None
        return metrics
