"""The cross-domain transfer table (README, "Transfer across domains"): each checkpoint, trained on
Omniglot's training split, scored on its own test split and on other datasets' test episodes, at
5-way 1-shot and 5-shot, mean ± 95% CI over 600 episodes, after the inner steps each learner is
tested with.

    python benchmarks/transfer_table.py --row "MAML=runs/maml/checkpoints/final.pt" \\
        --row "ProtoNets=runs/proto/checkpoints/best.pt" \\
        --row "baseline, nearest centroid=runs/base/checkpoints/final.pt@0" \\
        --row "baseline, fine-tuned=runs/base/checkpoints/final.pt@100@algorithm.head_init=zero" \\
        --dataset glyphs=data/glyphs --dataset Fashion-MNIST=data/fashion_mnist

A row is NAME=CHECKPOINT[@STEPS[@algorithm.FIELD=VALUE...]] (default steps: the largest of the
checkpoint's eval.inner_steps; the fields: the baseline's test-time finetune and head_init).
Evaluation runs in this process (distmeta.evaluate), as `distmeta evaluate --shards` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from distmeta.checkpoint import load_checkpoint
from distmeta.config import load_config
from distmeta.evaluate import eval_steps, evaluate, on_other_data

SHOTS = (1, 5)


def score(cfg, params, steps: int, shots: int, episodes: int, shards: str | None) -> str:
    cfg = dataclasses.replace(
        cfg, eval=dataclasses.replace(cfg.eval, num_tasks=episodes, ways=5, shots=[shots], inner_steps=[steps])
    )
    cfg, model_data = on_other_data(cfg, params.size, shards, "test") if shards else (cfg, None)
    (row,) = [r for r in evaluate(cfg, params, model_data=model_data) if r.steps == steps]
    return f"{100 * row.mean:.1f} ± {100 * row.ci95:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--row", action="append", required=True, help="NAME=CHECKPOINT[@STEPS[@algorithm.FIELD=VALUE...]]"
    )
    parser.add_argument("--dataset", action="append", default=[], help="NAME=SHARDS (other domains' columns)")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: beside a training run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    datasets = [("Omniglot", None)] + [tuple(d.split("=", 1)) for d in args.dataset]
    header = [f"{name} {shots}-shot" for name, _ in datasets for shots in SHOTS]
    print("| model | steps | " + " | ".join(header) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in header) + " |")
    for row in args.row:
        name, target = row.split("=", 1)
        path, steps, *settings = [*target.split("@"), ""][: max(2, target.count("@") + 1)]
        cfg, params, state = load_checkpoint(path)
        cfg = load_config(None, settings, base=cfg.to_dict())
        steps = int(steps) if steps else max(eval_steps(cfg))
        started = time.time()
        cells = [score(cfg, params, steps, shots, args.episodes, shards) for _, shards in datasets for shots in SHOTS]
        print(f"| {name} | {steps} | " + " | ".join(cells) + " |", flush=True)
        print(
            f"{name}: {path} (training step {state['step']}), scored in {time.time() - started:.0f} s", file=sys.stderr
        )


if __name__ == "__main__":
    main()
