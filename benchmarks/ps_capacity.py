"""Parameter-server capacity: how many worker updates per second each aggregation design absorbs,
and so how many workers it can feed. Simulated workers (no model: each returns a ready update of
the given size, as a fresh object every step), synchronous steps pipelined 4 deep as the tasks
engine does, side by side in one run:

  single      one ParameterServer actor (the default): every worker's update goes to it; it sums
              them, takes the Adam step, and every worker reads the new parameters from it
  sharded K   the flat vector split across K ParameterServer actors, each summing and stepping
              its slice; each worker sends slice k to shard k and reads the K slices back
  allreduce   no server (cluster.reduce=allreduce): the workers sum their updates with
              torch.distributed over gloo and each takes the same Adam step on its own copy

Reported per design, update size and worker count: steps/s end to end, updates/s (workers x
steps/s), the server's time per step inside ``apply`` (the finite check, the sum, the optimizer
step; the slowest shard) as wall time and as the CPU time of its thread, and the driver's CPU time
per step (its process: Ray's submission threads included). On a machine with fewer cores than
actors the wall times include waiting for a core; the CPU times do not, so capacity is read from
them: the server's CPU time grows linearly in the workers, cpu(W) = a + b W, and with a core of its
own it feeds (1/r - a) / b workers at r steps/s each. The driver's CPU time (the tasks engine
submits calls for every worker every step) is fitted the same way. All-reduce has no server: its
row is the workers' step (all-reduce plus the Adam step), wall time, as measured here.

    python benchmarks/ps_capacity.py [--sizes-mb 0.5 8 48] [--workers 1 2 4 8 16] [--seconds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import deque

import numpy as np
import ray
import torch

from distmeta.config import load_config
from distmeta.params import shard_bounds
from distmeta.runtime.allreduce import Replica, meeting_point
from distmeta.runtime.control import StepControl, WorkerTiming, WorkerUpdate
from distmeta.runtime.parameter_server import ParameterServer

INFLIGHT = 4  # steps submitted ahead of the one read, as cluster.max_inflight_steps
WARMUP_STEPS = 3
MIN_STEPS = 5


def simulated_result(control: StepControl, rank: int, update: np.ndarray) -> WorkerUpdate:
    """What ``Worker.compute`` returns, for a ready ``update`` of one task."""
    now = time.time()
    return WorkerUpdate(
        step=control.step,
        generation=control.generation,
        draw=control.step,
        update=update,
        finite=True,  # a real worker checks its update (its own time, not the server's)
        first_task=rank,
        metrics={"loss": 1.0},
        implementation="simulated",
        timing=WorkerTiming(rank, 1, now, now, now),
    )


class SimulatedWorker:
    """Returns the same update each step, sliced for the server's shards (Ray copies it into the
    object store on every return, as it would a computed one)."""

    def __init__(self, rank: int, size: int, shards: int):
        self.rank, self.bounds = rank, shard_bounds(size, shards)
        self.update = np.random.default_rng(rank).standard_normal(size).astype(np.float32)

    def compute(self, control: StepControl, *param_slices: np.ndarray):
        parts = [simulated_result(control, self.rank, self.update[lo:hi]) for lo, hi in self.bounds]
        return parts[0] if len(parts) == 1 else tuple(parts)


class TimedServer(ParameterServer):
    """The real server, also reporting the CPU time of its ``apply``."""

    def apply(self, control: StepControl, *results: WorkerUpdate) -> dict:
        cpu = time.thread_time()
        metrics = super().apply(control, *results)
        cpu_s = time.thread_time() - cpu
        return {"apply_started": metrics.apply_started, "apply_finished": metrics.apply_finished, "apply_cpu_s": cpu_s}


class AllreduceWorker:
    """A worker of the all-reduce design, with the real ``Replica`` (runtime/allreduce.py): sums
    its update with the others' over gloo, then takes the Adam step on its own copy. Its time is
    the whole of that, wall time (gloo runs the collective on threads of its own)."""

    def __init__(self, cfg, rank: int, world: int, size: int):
        self.cfg, self.rank, self.world, self.size = cfg, rank, world, size
        self.update = np.random.default_rng(rank).standard_normal(size).astype(np.float32)

    def meeting_point(self) -> str:
        return meeting_point()

    def join(self, address: str) -> bool:
        initial, ranks = np.zeros(self.size, dtype=np.float32), list(range(self.world))
        self.replica = Replica(self.cfg, initial, None, address, ranks, self.rank, torch.device("cpu"))
        return True

    def step(self, control: StepControl) -> dict:
        update = self.update.copy()  # a fresh update, as a real step's (the sum goes into it)
        started = time.time()
        self.replica.apply(control, simulated_result(control, self.rank, update))
        finished = time.time()
        return {"apply_started": started, "apply_finished": finished, "apply_cpu_s": finished - started}


def measure(submit, seconds: float) -> dict:
    """Run steps (``submit(step)`` -> refs of that step's server metrics), ``INFLIGHT`` ahead of
    the one read; returns the rates and times per step after the warm-up."""
    pending: deque = deque()
    wall: list[float] = []
    cpu: list[float] = []
    step, read, started = 0, 0, None
    while started is None or read < WARMUP_STEPS + MIN_STEPS or time.perf_counter() - started < seconds:
        while len(pending) <= INFLIGHT:
            pending.append(submit(step))
            step += 1
        metrics = ray.get(pending.popleft())
        read += 1
        if read == WARMUP_STEPS:
            started, driver_cpu, measured_from = time.perf_counter(), time.process_time(), read
        elif read > WARMUP_STEPS:
            wall.append(max(m["apply_finished"] - m["apply_started"] for m in metrics))
            cpu.append(max(m["apply_cpu_s"] for m in metrics))
    steps, elapsed, driver_cpu = read - measured_from, time.perf_counter() - started, time.process_time() - driver_cpu
    for refs in pending:  # let the last steps finish before the actors go
        ray.get(refs)
    return {
        "steps_per_s": steps / elapsed,
        "server_wall_ms": 1e3 * float(np.mean(wall)),
        "server_cpu_ms": 1e3 * float(np.mean(cpu)),
        "driver_cpu_ms": 1e3 * driver_cpu / steps,
    }


def server_design(cfg, size: int, workers: int, shards: int, seconds: float) -> dict:
    initial = np.zeros(size, dtype=np.float32)
    servers = [
        ray.remote(TimedServer).options(num_cpus=0).remote(cfg, initial, None, b) for b in shard_bounds(size, shards)
    ]
    sims = [ray.remote(SimulatedWorker).options(num_cpus=0).remote(r, size, shards) for r in range(workers)]
    params = [server.parameters.remote() for server in servers]

    def submit(step: int) -> list:
        nonlocal params
        control = StepControl(step)
        outputs = [sim.compute.options(num_returns=shards).remote(control, *params) for sim in sims]
        parts = [[out] if shards == 1 else out for out in outputs]
        metrics = [server.apply.remote(control, *[p[k] for p in parts]) for k, server in enumerate(servers)]
        params = [server.parameters.remote(control) for server in servers]  # after apply: actor order
        return metrics

    try:
        return measure(submit, seconds)
    finally:
        for actor in [*servers, *sims]:
            ray.kill(actor)


def allreduce_design(cfg, size: int, workers: int, seconds: float) -> dict:
    actors = [ray.remote(AllreduceWorker).options(num_cpus=0).remote(cfg, r, workers, size) for r in range(workers)]
    address = ray.get(actors[0].meeting_point.remote())
    ray.get([actor.join.remote(address) for actor in actors])

    def submit(step: int) -> list:
        return [actor.step.remote(StepControl(step)) for actor in actors]

    try:
        return measure(submit, seconds)
    finally:
        for actor in actors:
            ray.kill(actor)


def fit_workers_fed(rows: list[dict], key: str, rate: float) -> tuple[float, float, int | None]:
    """Least-squares t(W) = a + b W of ``key`` (ms per step) over ``rows``; the workers W it
    keeps up with at ``rate`` steps/s each, t(W) = 1 / rate (None: not even one, or no fit)."""
    w = np.array([r["workers"] for r in rows], dtype=float)
    t = np.array([r[key] / 1e3 for r in rows])
    if len(rows) < 2:
        return float(t[0]), 0.0, None
    b, a = np.polyfit(w, t, 1)
    fed = int((1.0 / rate - a) / b) if b > 0 and a < 1.0 / rate else None
    return float(a), float(b), fed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[0.5, 8, 48])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per row, after the warm-up")
    parser.add_argument("--rate", type=float, default=10.0, help="per-worker steps/s for the workers-fed column")
    parser.add_argument("--json", default="", help="also write the rows here")
    args = parser.parse_args()
    cfg = load_config(None, ["meta_optimizer.name=adam"])
    ray.init(include_dashboard=False, log_to_driver=False)
    designs = ["single", *[f"sharded {k}" for k in args.shards], "allreduce"]
    rows = []
    print(
        f"{'update':>8} {'design':>10} {'workers':>7} {'steps/s':>8} {'updates/s':>10}   server wall / CPU ms"
        "   driver CPU ms (per step)"
    )
    for mb in args.sizes_mb:
        size = int(mb * 2**20 / 4)
        for design in designs:
            for workers in args.workers:
                if design == "allreduce":
                    found = allreduce_design(cfg, size, workers, args.seconds)
                else:
                    shards = int(design.split()[1]) if design.startswith("sharded") else 1
                    found = server_design(cfg, size, workers, shards, args.seconds)
                rows.append({"mb": mb, "design": design, "workers": workers} | found)
                print(
                    f"{mb:>6g}MB {design:>10} {workers:>7} {found['steps_per_s']:>8.1f} "
                    f"{workers * found['steps_per_s']:>10.0f} {found['server_wall_ms']:>11.2f} / "
                    f"{found['server_cpu_ms']:<8.2f} {found['driver_cpu_ms']:>10.2f}",
                    flush=True,
                )
    print(
        f"\ntime per step t(W) = a + b W, fitted over W = {args.workers}; W fed at {args.rate:g} steps/s each, "
        "t(W) = 1 / rate\n(server: its CPU time, all-reduce: the workers' step, wall; driver: its CPU time, "
        "submitting each worker's calls as the tasks engine does)"
    )
    for mb in args.sizes_mb:
        for design in designs:
            found = [r for r in rows if r["mb"] == mb and r["design"] == design]
            a, b, fed = fit_workers_fed(found, "server_cpu_ms", args.rate)
            da, db, driver_fed = fit_workers_fed(found, "driver_cpu_ms", args.rate)
            print(
                f"{mb:>6g}MB {design:>10}: server a = {1e3 * a:7.2f} ms, b = {1e3 * b:6.3f} ms/worker, fed {fed}; "
                f"driver a = {1e3 * da:5.2f} ms, b = {1e3 * db:5.3f} ms/worker, fed {driver_fed}"
            )
    machine = f"{os.cpu_count()} cores" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": machine, "rows": rows}, out, indent=1)


if __name__ == "__main__":
    main()
