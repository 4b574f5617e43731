"""All-reduce mode (``cluster.reduce=allreduce``): no parameter server between the workers.

Each worker keeps its own copy of the meta-parameters and the meta-optimizer (a ``MetaOptimizer``,
as the server holds, so the update math is the server's). A step: every worker computes the update
of its share of the meta-batch, the workers sum their updates with ``torch.distributed`` (gloo on
CPU; NCCL on GPU, which every CUDA build of torch carries), and each takes the same optimizer step
on the same sum, so the copies stay identical. Each worker sends and receives about twice the
update per step (a ring) however many workers there are, where one server receives every worker's
update and sends every worker the parameters.

Three parts, one per side: ``Replica`` is a worker's copy and its place in the process group;
``GroupMember`` is what a worker actor does in this mode (``runtime/worker.Worker`` is one: it
runs ``cluster.steps_per_call`` steps a call, as it owns the meta-optimizer); and
``Group`` is the supervisor's side: it forms the group and knows which process of each worker is
in it. The group's first member picks where it meets (its node's address and a free port).

A process group cannot lose or gain a member (and a survivor of a lost NCCL peer cannot be trusted
to tear its group down). After a fault, and when a worker rejoins, every worker is started afresh
and the group formed again from the newest checkpoint: the steps since are re-run (with the same
results). The first member's copy is the one checkpointed and evaluated.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from distmeta.checkpoint import CheckpointStore
from distmeta.config import Config
from distmeta.runtime.control import (
    MetaOptimizerStatus,
    Rejection,
    StepControl,
    StepMetrics,
    WorkerTiming,
    WorkerUpdate,
)
from distmeta.runtime.meta_optimizer import MetaOptimizer


def meeting_point() -> str:
    """HOST:PORT on this node where a new process group can meet (the port is free now)."""
    import ray  # here, not above: a Worker runs without Ray too (in-process evaluation, benchmarks)

    with socket.socket() as probe:
        probe.bind(("", 0))
        return f"{ray.util.get_node_ip_address()}:{probe.getsockname()[1]}"


class Replica:
    """A worker's copy of the meta-parameters and meta-optimizer (from the newest checkpoint in
    ``checkpoints``, if any), and its place in the process group of the workers ``ranks`` (in
    group order) that meets at ``address``, for the steps of engine generation ``generation``."""

    def __init__(
        self,
        cfg: Config,
        initial: np.ndarray,
        checkpoints: str | None,
        address: str,
        ranks: list[int],
        rank: int,
        device: torch.device,
        generation: int = 0,
    ):
        self.ranks, self.position, self.device, self.generation = ranks, ranks.index(rank), device, generation
        store = CheckpointStore(checkpoints) if checkpoints else None
        self.meta = MetaOptimizer.latest(cfg, store, np.asarray(initial), len(initial))
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
        if control.generation != self.generation:
            return StepMetrics(control.step, stale=True)
        self.meta.check_step(control.step, [result])
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
        metrics = self.meta.apply([summed])
        metrics.workers = [WorkerTiming(rank, int(row[2]), *row[3:].tolist()) for rank, row in zip(self.ranks, rows)]
        if metrics.rejected:  # name the workers that sent non-finite updates (all: finite ones overflowed)
            flagged = [(rank, row) for rank, row in zip(self.ranks, rows) if row[0]] or list(zip(self.ranks, rows))
            metrics.rejected = [Rejection(rank, (int(row[1]), int(row[1] + row[2]))) for rank, row in flagged]
        first = self.position == 0
        return self.meta.attach(metrics, first and control.publish, control.checkpoint if first else None)


class GroupMember:
    """What a worker actor does in all-reduce mode (``runtime/worker.Worker`` is one): offer a
    meeting point, join a group with a fresh replica, run whole steps in it, report its copy."""

    replica: Replica | None = None

    def meeting_point(self) -> str:
        """The first member of a new group: where the group meets (HOST:PORT)."""
        return meeting_point()

    def join(
        self, address: str, ranks: list[int], initial: np.ndarray, checkpoints: str, generation: int
    ) -> tuple[int, int]:
        """Take a copy of the meta-parameters and optimizer (from the newest checkpoint, if any)
        and a place in the process group of the workers ``ranks`` meeting at ``address``, for the
        steps of engine generation ``generation``. Returns the copy's step and this process's id
        (a group is only ever joined by a fresh process: the supervisor checks the id changed)."""
        self.replica = Replica(self.cfg, initial, checkpoints, address, ranks, self.rank, self.device, generation)
        return self.replica.meta.step, os.getpid()

    def steps(self, controls: list[StepControl], batches: list) -> list[StepMetrics]:
        """Whole steps, one after the other: for each, this worker's update of its batch at the
        parameters after the step before, summed with the others', applied."""
        return [
            self.replica.apply(control, self.compute(control, tasks, self.replica.meta.parameters()))
            for control, tasks in zip(controls, batches)
        ]

    def replica_status(self) -> MetaOptimizerStatus:
        """Where this worker's copy stands (``MetaOptimizer.status``, as a parameter server answers)."""
        return self.replica.meta.status()

    def replica_state(self) -> dict:
        """This worker's copy as a checkpoint's part (``MetaOptimizer.state``)."""
        return self.replica.meta.state()


class Group:
    """The supervisor's side: forms the process group of the live workers, and remembers which
    process of each joined it, so that a worker is restarted before it joins the next group."""

    def __init__(self, workers: list, cluster):
        self.workers, self.cluster = workers, cluster
        self.members: dict[int, int] = {}  # rank -> the process that joined the current group

    def joined(self, ranks: list[int]) -> list[int]:
        """Those of ``ranks`` whose process is in the current group (they need a fresh one)."""
        return [rank for rank in ranks if rank in self.members]

    def leave(self, rank: int) -> int | None:
        """Worker ``rank`` leaves the group (it is being restarted): its process id, if it had joined."""
        return self.members.pop(rank, None)

    def form(self, live: list[int], initial, checkpoints: str, generation: int) -> int:
        """A new group of the workers ``live`` (each in a process that was in no group), all from
        the newest checkpoint; returns the step they start at."""
        import ray

        c = self.cluster
        address = ray.get(self.workers[live[0]].meeting_point.remote(), timeout=c.step_timeout_s)
        joined = ray.get(
            [self.workers[rank].join.remote(address, live, initial, checkpoints, generation) for rank in live],
            timeout=c.rejoin_timeout_s + c.step_timeout_s,
        )
        self.members = {rank: pid for rank, (_, pid) in zip(live, joined)}
        steps = {step for step, _ in joined}
        if len(steps) > 1:
            raise RuntimeError(f"the workers' copies of the parameters are at different steps {sorted(steps)}")
        return steps.pop()

    def first_copy(self, live: list[int], method: str):
        """``replica_status`` or ``replica_state`` of the first live worker: the copy the run reads."""
        import ray

        return ray.get(getattr(self.workers[live[0]], method).remote(), timeout=self.cluster.step_timeout_s)
