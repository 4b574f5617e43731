"""Meta-training throughput (tasks/s) for second-order MAML on Conv4 with Omniglot-sized tasks:
5-way 1-shot, 15 queries per class, one inner step, meta-batch 32. Side by side in one run, on the
same cores:

  in-process loop / vmap   Worker.compute + ParameterServer.apply in one process, torch using all cores
  ray 1 worker             the full system (launch.py's code path), one worker with all cores
  ray 2 workers            the full system, two workers with half the cores each
(the engine is cluster.engine=auto's choice; it is printed with each row)

    python benchmarks/conv4_throughput.py [--steps 30] [--device cpu|cuda] [--in-process-only]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from distmeta.algorithms import initial_parameters
from distmeta.config import load_config
from distmeta.runtime.control import StepControl
from distmeta.runtime.engine import choose_engine
from distmeta.runtime.parameter_server import ParameterServer
from distmeta.runtime.task_generator import TaskGenerator
from distmeta.runtime.worker import Worker
from distmeta.tasks import build_source

CONFIG = "configs/omniglot_synthetic_maml.yaml"


def in_process(cfg, implementation: str, steps: int, device: str) -> float:
    initial = initial_parameters(cfg, build_source(cfg.task))
    generator = TaskGenerator(cfg, [cfg.train.meta_batch_size], [0], prefetch=False)
    worker, server = Worker(cfg, device=torch.device(device)), ParameterServer(cfg, initial)
    worker.implementation = implementation
    batches = [generator.build(step)[0] for step in range(steps + 2)]  # data generation is not timed here

    def step(i: int) -> None:
        control = StepControl(i)
        server.apply(control, worker.compute(control, batches[i], server.parameters()))

    step(0), step(1)  # warm-up
    start = time.perf_counter()
    for i in range(2, steps + 2):
        step(i)
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * cfg.train.meta_batch_size / (time.perf_counter() - start)


def on_ray(cfg, workers: int, steps: int, logdir: str) -> float:
    from distmeta.train import train

    cores = os.cpu_count() or 1
    cfg.cluster.num_workers, cfg.cluster.cpus_per_worker = workers, max(1.0, cores / workers)
    cfg.train.steps, cfg.train.eval_every, cfg.eval.num_tasks, cfg.logdir = steps + 1, 0, 32, logdir
    return train(cfg).tasks_per_s  # steady state: every step after the first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--in-process-only", action="store_true", help="no Ray (e.g. on a machine without it)")
    parser.add_argument("--logdir", default="runs/benchmarks")
    args = parser.parse_args()
    cfg = load_config(CONFIG, ["eval.inner_steps=[1]"])
    results = {}
    for implementation in ("loop", "vmap"):
        name = f"in-process {implementation}"
        results[name] = in_process(cfg, implementation, args.steps, args.device)
        print(f"{name:>22}: {results[name]:8.1f} tasks/s", flush=True)
    if not args.in_process_only:
        for workers in (1, 2):
            name = f"ray {workers} worker{'s' if workers > 1 else ''}"
            cfg = load_config(CONFIG, ["eval.inner_steps=[1]"])
            results[name] = on_ray(cfg, workers, args.steps, args.logdir)
            print(f"{name:>22}: {results[name]:8.1f} tasks/s ({choose_engine(cfg)} engine)", flush=True)
        best = max(v for k, v in results.items() if k.startswith("in-process"))
        for workers in (1, 2):
            name = f"ray {workers} worker{'s' if workers > 1 else ''}"
            print(f"{name} / best in-process: {results[name] / best:.0%}")
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(json.dumps({"device": device, "steps": args.steps, "tasks_per_s": results}))


if __name__ == "__main__":
    main()
