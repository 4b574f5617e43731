"""MAML-TRPO (or ProMP) on 2-D navigation with the paper's settings, scored every ``--evaluate-every``
meta-steps with the paper's protocol: 40 held-out goals, 40 episodes per update, step sizes 0.1
then 0.05, mean return after 0-3 steps with a 95% CI. The README's table comes from it.

    python benchmarks/navigation2d.py --steps 500                      # in one process, one thread
    python benchmarks/navigation2d.py --steps 500 --workers 2          # on a local Ray, 2 worker actors
    python benchmarks/navigation2d.py --steps 500 --resume runs/navigation2d/theta_100.npy

A MAML-TRPO step is a pure function of the seed, the step and theta, so ``--resume`` continues a run
exactly from the parameters it saved (ProMP's Adam moments are not saved: its resume is not exact).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from distmeta.rl.evaluate import adaptation_curve
from distmeta.rl.local import LocalMetaRL
from distmeta.rl.maml_trpo import MamlTrpoConfig
from distmeta.rl.promp import ProMPConfig

TEST_SEED = 1234  # the held-out goals and their episodes: disjoint from training's (seed, step) streams


def evaluate(loop, step: int, started: float) -> dict:
    tasks = loop.env.sample_tasks(np.random.default_rng([TEST_SEED, 0]), 40)
    rngs = [np.random.default_rng([TEST_SEED, 1, task]) for task in range(40)]
    curve = adaptation_curve(loop.learner, loop.layout.unflatten(loop.theta), tasks, [0.1, 0.05, 0.05], 40, rngs)
    row = {"eval_step": step, "mean": curve.mean.round(2).tolist(), "ci95": curve.ci95.round(2).tolist()}
    return row | {"wall_s": round(time.time() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--algorithm", choices=("maml_trpo", "promp"), default="maml_trpo")
    parser.add_argument("--workers", type=int, default=0, help="Ray worker actors (0: one process, no Ray)")
    parser.add_argument("--evaluate-every", type=int, default=50)
    parser.add_argument("--out", default="runs/navigation2d")
    parser.add_argument("--resume", help="a theta_<step>.npy this script saved: continue from that step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg, meta_batch = (MamlTrpoConfig(), 20) if args.algorithm == "maml_trpo" else (ProMPConfig(), 40)
    if args.workers:
        import ray

        from distmeta.rl.distributed import RayMetaRL

        ray.init(num_cpus=args.workers, include_dashboard=False)
        loop = RayMetaRL("navigation2d", cfg, meta_batch, args.workers)
    else:
        loop = LocalMetaRL("navigation2d", cfg, meta_batch)
    out, start, started = Path(args.out), 0, time.time()
    out.mkdir(parents=True, exist_ok=True)
    if args.resume:
        start = int(re.fullmatch(r"theta_(\d+)\.npy", Path(args.resume).name).group(1))
        loop.theta = torch.from_numpy(np.load(args.resume, allow_pickle=False))  # nothing in it can run
    else:
        print(json.dumps(evaluate(loop, 0, started)), flush=True)
    for step in range(start, args.steps):
        m = loop.step(step)
        rate = (step + 1 - start) / (time.time() - started)
        print(
            json.dumps(
                {
                    "step": step,
                    "before": round(m.return_before, 2),
                    "after": round(m.return_after, 2),
                    "kl": round(m.kl, 5),
                    "accepted": m.accepted,
                    "rollout_s": round(m.rollout_s, 2),
                    "learn_s": round(m.learn_s, 2),
                    "eta_s": round((args.steps - step - 1) / rate),
                }
            ),
            flush=True,
        )
        if (step + 1) % args.evaluate_every == 0 or step + 1 == args.steps:
            np.save(out / f"theta_{step + 1}.npy", loop.theta.numpy())
            print(json.dumps(evaluate(loop, step + 1, started)), flush=True)


if __name__ == "__main__":
    main()
