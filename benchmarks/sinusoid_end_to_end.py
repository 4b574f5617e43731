"""Sinusoid MAML, the paper's setup (K = 10, one inner step, alpha = 0.01, meta-batch 25, Adam 1e-3):
the full Ray system against plain single-process loops doing the same math, in one run.

  plain-core   distmeta.runtime.local.LocalLoop: the same objects (TaskGenerator, Worker,
               ParameterServer) in one process without Ray: the difference to the system is
               coordination alone
  plain-bmm    a hand-batched PyTorch loop (bmm over tasks, autograd with create_graph): the fastest
               plain implementation we know for this model, no torch.func
  ray-system   launch.py's code path: actors, prefetching, pipelining, TensorBoard

    python benchmarks/sinusoid_end_to_end.py --steps 70000      # the paper's length
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from distmeta.config import load_config
from distmeta.models import build_model
from distmeta.runtime.local import LocalLoop
from distmeta.runtime.task_generator import TaskGenerator
from distmeta.tasks import build_source
from distmeta.train import train


def plain_core(cfg) -> float:
    loop = LocalLoop(cfg)
    start = time.perf_counter()
    loop.run()
    return time.perf_counter() - start


def plain_bmm(cfg) -> float:
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, build_source(cfg.task).spec)
    weights = [p.detach().clone().requires_grad_() for p in model.parameters()]
    optimizer = torch.optim.Adam(weights, lr=cfg.meta_optimizer.lr)
    alpha, tasks = cfg.algorithm.inner_lr, cfg.train.meta_batch_size
    generator = TaskGenerator(cfg, [tasks], [0], prefetch=False)

    def forward(w, x):  # w: per-task weights [T, ...]; x: [T, N, 1]
        h = torch.relu(torch.baddbmm(w[1].unsqueeze(1), x, w[0].transpose(1, 2)))
        h = torch.relu(torch.baddbmm(w[3].unsqueeze(1), h, w[2].transpose(1, 2)))
        return torch.baddbmm(w[5].unsqueeze(1), h, w[4].transpose(1, 2))

    start = time.perf_counter()
    for step in range(cfg.train.steps):
        sx, sy, qx, qy = generator.build(step)[0].to_torch(torch.device("cpu"), torch.float32)
        expanded = [w.expand(tasks, *w.shape) for w in weights]
        support_loss = ((forward(expanded, sx) - sy) ** 2).mean(dim=(1, 2)).sum()
        grads = torch.autograd.grad(support_loss, expanded, create_graph=True)
        adapted = [w - alpha * g for w, g in zip(expanded, grads)]
        query_loss = ((forward(adapted, qx) - qy) ** 2).mean(dim=(1, 2)).mean()
        optimizer.zero_grad()
        query_loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=70_000)
    parser.add_argument("--logdir", default="runs/benchmarks")
    parser.add_argument("--only", choices=("plain-core", "plain-bmm", "ray-system"), action="append")
    args = parser.parse_args()
    cfg = load_config("configs/sinusoid_maml_paper.yaml", [f"train.steps={args.steps}", f"logdir={args.logdir}"])
    results = {}
    for name, run in (("plain-bmm", plain_bmm), ("plain-core", plain_core), ("ray-system", None)):
        if args.only and name not in args.only:
            continue
        if run is None:
            outcome = train(cfg)
            seconds = outcome.train_s
        else:
            seconds = run(cfg)
        results[name] = seconds
        print(f"{name:>11}: {seconds:8.1f} s  {seconds / args.steps * 1e3:6.2f} ms/step", flush=True)
    for base in ("plain-bmm", "plain-core"):
        if base in results and "ray-system" in results:
            print(f"ray-system / {base}: {results['ray-system'] / results[base]:.2f}x")
    print(json.dumps({"steps": args.steps, "seconds": results}))


if __name__ == "__main__":
    main()
