"""The meta-RL system's overhead on 2-D navigation, MAML-TRPO at the paper's sizes (meta-batch 20,
20 episodes a task, 100 steps an episode: 80,000 environment steps a meta-step): a plain
single-process loop (``LocalMetaRL``: the same generator, workers and server called in this
process, no Ray, one torch thread) against the system on a local Ray with 1 and with 2 worker
actors of one core each (and one worker without the workers' glibc malloc settings), the same
steps side by side in one run, interleaved step by step. It
prints seconds per meta-step, environment steps per second of rollouts per worker, and each
layout's time as a ratio to the loop's. Run it alone on the machine.

    python benchmarks/navigation2d.py --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import ray
import torch

from distmeta.config import load_config
from distmeta.rl.distributed import RayMetaRL
from distmeta.rl.local import LocalMetaRL
from distmeta.rl.setup import MetaRLSetup

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "navigation2d_maml_trpo.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="meta-steps per layout (the first is not timed)")
    parser.add_argument("--algorithm", choices=("maml_trpo", "promp"), default="maml_trpo")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(CONFIG, [f"algorithm.name={args.algorithm}", "train.meta_batch_size=20"])
    setup = MetaRLSetup.of(cfg)
    # every system's workers live at once (4 logical CPUs), but only one layout runs at a time
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    layouts = {"plain loop (1 process, 1 thread)": LocalMetaRL(setup)}
    for workers, tuned in ((1, False), (1, True), (2, True)):
        system = RayMetaRL(setup, workers, cpus_per_worker=1, malloc_settings=tuned)
        system.ready(600)
        untuned = "" if tuned else ", glibc malloc untuned"
        layouts[f"system, {workers} worker{'s' * (workers > 1)} x 1 CPU{untuned}"] = system
    seconds = {name: [] for name in layouts}
    rate = {name: [] for name in layouts}
    rollout_rate = {name: [] for name in layouts}
    for step in range(args.steps):
        for name, layout in layouts.items():
            started = time.perf_counter()
            metrics, _ = layout.step(step)
            elapsed = time.perf_counter() - started
            if step:  # the first step of each includes its start-up
                seconds[name].append(elapsed)
                rate[name].append(metrics.environment_steps / elapsed)
                workers = len(layout.workers)
                rollout_rate[name].append(metrics.environment_steps / workers / metrics.rollout_s)
    plain = float(np.median(seconds[next(iter(layouts))]))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    for name in layouts:
        step_s = float(np.median(seconds[name]))
        row = {
            "layout": name,
            "s_per_step": round(step_s, 3),
            "env_steps_per_s": round(float(np.median(rate[name]))),
            "rollout_env_steps_per_s_per_worker": round(float(np.median(rollout_rate[name]))),
            "speed_vs_plain_loop": round(plain / step_s, 2),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
