"""What brings 2-D navigation to the MAML paper's Table 4 (docs/meta_rl.md, "What closed the gap"):
the shipped config (the paper's code, cbfinn/maml_rl) against it with one of tristandeleu/pytorch-maml-rl's
choices put back at a time, each trained from the same seed for ``--steps`` meta-steps in one
process (``LocalMetaRL``, one torch thread) and scored on the 40 test goals with its own test
protocol (40 episodes per update; the config's step sizes, or 0.1 then 0.05 for the raw velocity):

- ``paper-code``: configs/navigation2d_maml_trpo.yaml as shipped;
- ``per-episode-mean``: losses as the mean over episodes of each episode's mean over its steps;
- ``tanh-64``: a policy of 2 x 64 tanh units;
- ``raw-velocity``: actions as velocities clipped to [-0.1, 0.1], inner step 0.1.

    python benchmarks/navigation2d_ablation.py --steps 50            # about 7 min a variant here
    python benchmarks/navigation2d_ablation.py --steps 50 --only tanh-64
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import time

import numpy as np
import torch

from distmeta.config import load_config
from distmeta.rl.envs import Navigation2D
from distmeta.rl.episodes import Episodes
from distmeta.rl.evaluate import adaptation_curve
from distmeta.rl.local import LocalMetaRL, held_out
from distmeta.rl.setup import MetaRLSetup, eval_episodes, eval_step_sizes, eval_steps

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "navigation2d_maml_trpo.yaml")
TEST_GOALS = 40


class RawVelocityNavigation(Navigation2D):
    """pytorch-maml-rl's action: the velocity itself, clipped to the top speed."""

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return super().step(np.clip(actions, -self.max_speed, self.max_speed) / self.max_speed)


def per_episode_mean(self: Episodes, values: torch.Tensor) -> torch.Tensor:
    """pytorch-maml-rl's average: each episode's mean over its steps, then the mean over episodes."""
    return ((values * self.mask).sum(1) / self.lengths).mean(1)


VARIANTS = {
    "paper-code": [],
    "per-episode-mean": [],
    "tanh-64": ["model.hidden=[64,64]", "rl.activation=tanh"],
    "raw-velocity": ["algorithm.inner_lr=0.1", "eval.step_sizes=[0.1,0.05]"],
}


@contextlib.contextmanager
def averaging(variant: str):
    shipped = Episodes.step_mean
    if variant == "per-episode-mean":
        Episodes.step_mean = per_episode_mean
    try:
        yield
    finally:
        Episodes.step_mean = shipped


def run(variant: str, steps: int) -> None:
    cfg = load_config(CONFIG, VARIANTS[variant])
    setup = MetaRLSetup.of(cfg)
    if variant == "raw-velocity":
        setup = dataclasses.replace(setup, env=RawVelocityNavigation)
    group, started = LocalMetaRL(setup), time.time()
    with averaging(variant):
        for step in range(steps):
            metrics, _ = group.step(step)
            if step % 10 == 0 or step == steps - 1:
                print(
                    f"  {variant} step {step + 1}: return {metrics.return_before:.1f} -> {metrics.return_after:.1f}, "
                    f"episode length after {metrics.length_after:.0f} ({time.time() - started:.0f} s)",
                    flush=True,
                )
        goals, rngs = held_out(setup.environment, cfg.eval.seed, "test", range(TEST_GOALS))
        theta = group.layout.unflatten(group.theta.detach())
        sizes = eval_step_sizes(cfg)[: max(eval_steps(cfg))]
        returns = adaptation_curve(group.learner, theta, goals, sizes, eval_episodes(cfg)[0], rngs)
    print(
        f"| {variant} | {steps} | {sizes} | "
        + " | ".join(f"{m:.1f} ({med:.1f})" for m, med in zip(returns.mean(0), np.median(returns, 0)))
        + " |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="meta-steps of each variant")
    parser.add_argument("--only", action="append", choices=list(VARIANTS), help="run these variants (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("mean (median) return on the test goals after 0 / 1 / 2 / 3 inner steps")
    print("| variant | meta-steps | test step sizes | 0 steps | 1 step | 2 steps | 3 steps |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for variant in args.only or VARIANTS:
        run(variant, args.steps)


if __name__ == "__main__":
    main()
