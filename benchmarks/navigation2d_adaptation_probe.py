"""Where a 2-D navigation policy's adapted returns come from (docs/meta_rl.md, "2-D navigation beside the MAML
paper's Table 4"): adapt to the 40 test goals with the checkpoint's own test protocol, then after
each inner step

- roll out the adapted policy with its learned standard deviation scaled by 1, 0.5, 0.2 and 0.05
  (if the returns improve as the noise shrinks, the gap is exploration noise), and
- roll out its mean alone (deterministic), and report how far from the goal it stops and whether it
  heads the right way (cosine between where it stops and the goal).

    python benchmarks/navigation2d_adaptation_probe.py runs/<run>/checkpoints/final.pt
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from distmeta.checkpoint import load_checkpoint
from distmeta.params import DTYPES
from distmeta.rl.episodes import rollout, with_advantages
from distmeta.rl.local import held_out
from distmeta.rl.policies import per_task
from distmeta.rl.setup import MetaRLSetup, eval_step_sizes, eval_steps

NOISE_SCALES = (1.0, 0.5, 0.2, 0.05)
TASKS = 40


def main(checkpoint: str) -> None:
    torch.set_num_threads(1)
    cfg, flat, _ = load_checkpoint(checkpoint)
    learner, layout, _ = MetaRLSetup.of(cfg).build()
    theta = layout.unflatten(torch.tensor(flat, dtype=DTYPES[cfg.train.dtype]))
    goals, rngs = held_out(learner.env, cfg.eval.seed, "test", range(TASKS))
    episodes = cfg.eval.shots[0] if cfg.eval.shots else cfg.rl.episodes_per_task
    sizes = eval_step_sizes(cfg)[: max(eval_steps(cfg))]
    params = per_task(theta, TASKS)
    print(f"{checkpoint}: {TASKS} test goals, {episodes} episodes per step, step sizes {sizes}")
    for step, size in enumerate([*sizes, None]):
        probe = np.random.default_rng([9, step])
        returns = []
        for scale in NOISE_SCALES:
            scaled = params | {"log_std": params["log_std"] + np.log(scale)}
            streams = [np.random.default_rng(probe.integers(2**63)) for _ in range(TASKS)]
            collected = rollout(learner.policy, scaled, learner.env, goals, episodes, streams)
            returns.append(float(collected.returns().mean()))
        still = params | {"log_std": params["log_std"] - 30.0}  # the mean action alone
        path = rollout(learner.policy, still, learner.env, goals, 1, [np.random.default_rng(0)] * TASKS)
        stop = path.observations[:, -1, 0].double().numpy()
        miss = np.linalg.norm(stop - goals, axis=1)
        cosine = (stop * goals).sum(1) / (np.linalg.norm(stop, axis=1) * np.linalg.norm(goals, axis=1) + 1e-12)
        std = params["log_std"][0].exp().tolist()
        print(
            f"after {step} steps: std {[round(s, 3) for s in std]} | return with the std x "
            + ", ".join(f"{scale}: {r:.2f}" for scale, r in zip(NOISE_SCALES, returns))
            + f" | mean policy stops {miss.mean():.3f} from the goal (median {np.median(miss):.3f}; goals "
            f"{np.linalg.norm(goals, axis=1).mean():.3f} away), cosine to the goal {cosine.mean():.2f}",
            flush=True,
        )
        if size is None:
            break
        collected = rollout(learner.policy, params, learner.env, goals, episodes, rngs)
        params = learner.detached_step(params, with_advantages(collected, cfg.rl.gamma, cfg.rl.gae_lambda), lr=size)


if __name__ == "__main__":
    main(sys.argv[1])
