"""Time to accuracy: MAML on Omniglot 5-way 1-shot (configs/omniglot_maml_5w1s.yaml), validation
accuracy against wall time for the full system and for the plain per-task loop, on the same machine
and the same tasks, one after the other in one run.

  plain loop   benchmarks/peers.py's loop (no distmeta code in its math), all cores, building each
               step's episodes in its own loop from the same shards (the same tasks as the system's)
  system       ``train()``: an embedded Ray, the layout ``auto`` picks, TensorBoard, checkpoints

Both keep their parameters every ``--every`` steps (the system as its checkpoints, the plain loop as
copies, with the clock running). Wall time counts from the start of each run, so the system's Ray
start and actor creation are in it. Afterwards every snapshot is scored by the same code on the same
validation tasks (``--val-tasks`` of the validation characters, the config's test-time 3 inner
steps). Both do the same math in float32 (the first steps agree to 1e-7), so the curves differ in
time, not in accuracy at a step; steps per hour are the steady-state rates over the run.

    distmeta data build omniglot --src ../shared/data/omniglot --out data/omniglot
    python benchmarks/time_to_accuracy.py [--steps 500] [--every 100] [--val-tasks 300] [--bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from peers import PlainLoop, theta_flat  # the benchmarks folder is not a package

from distmeta.algorithms import initial_parameters
from distmeta.checkpoint import read_checkpoint
from distmeta.config import Config, load_config
from distmeta.evaluate import evaluate
from distmeta.runtime.task_generator import TaskGenerator
from distmeta.runtime.worker import Worker
from distmeta.tasks import build_source
from distmeta.train import train

CONFIG = "configs/omniglot_maml_5w1s.yaml"


def plain_run(cfg: Config, every: int) -> tuple[dict[int, tuple[float, np.ndarray]], float]:
    """{step: (seconds since start, parameters)} and the steady rate in steps/s (all steps but the first)."""
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    initial = initial_parameters(cfg, build_source(cfg.task))
    theta = list(Worker(cfg, device=torch.device("cpu"))._params(initial).values())
    loop = PlainLoop(cfg, [p.float() for p in theta])
    generator = TaskGenerator(cfg, [cfg.train.meta_batch_size], [0], prefetch=False)
    snapshots = {0: (0.0, theta_flat(loop.w).numpy())}
    first_done = 0.0
    for step in range(cfg.train.steps):
        loop.step(step, generator.build(step)[0].to_torch(torch.device("cpu"), torch.float32))
        first_done = first_done or time.perf_counter()
        if (step + 1) % every == 0 or step + 1 == cfg.train.steps:
            snapshots[step + 1] = (time.perf_counter() - started, theta_flat(loop.w).numpy())
        if (step + 1) % 50 == 0:
            print(f"  plain loop: step {step + 1}/{cfg.train.steps}, {time.perf_counter() - started:.0f} s", flush=True)
    return snapshots, (cfg.train.steps - 1) / (time.perf_counter() - first_done)


def system_run(cfg: Config, every: int) -> tuple[dict[int, tuple[float, np.ndarray]], float, str]:
    """The same from ``train()``: its checkpoints, timed by when each was written."""
    cfg.train.checkpoint_every, cfg.train.checkpoint_keep, cfg.train.eval_every = every, 0, 0
    cfg.eval.num_tasks, cfg.train.print_every_s = 2, 30.0  # its own final evaluation: a token one
    started = time.time()
    result = train(cfg)
    snapshots = {0: (0.0, initial_parameters(cfg, build_source(cfg.task)))}
    for path in sorted((result.run_dir / "checkpoints").glob("step_*.pt")):
        state = read_checkpoint(path)
        snapshots[state["step"]] = (path.stat().st_mtime - started, state["params"].numpy())
    layout = json.loads((result.run_dir / "placement.json").read_text())
    return snapshots, result.tasks_per_s / cfg.train.meta_batch_size, f"{len(layout['workers'])} worker(s)"


def accuracy(cfg: Config, params: np.ndarray, tasks: int) -> tuple[float, float]:
    """Mean validation accuracy and its 95% CI after the config's test-time inner steps."""
    cfg.eval.num_tasks, steps = tasks, max(cfg.eval.inner_steps)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        rows = evaluate(cfg, params.astype(np.float32), split="val")
    row = next(r for r in rows if r.steps == steps)
    return row.mean, row.ci95


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--every", type=int, default=100, help="keep the parameters every this many steps")
    parser.add_argument("--val-tasks", type=int, default=300)
    parser.add_argument("--bf16", action="store_true", help="also the system under train.autocast=bf16")
    parser.add_argument("--logdir", default="runs/benchmarks")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    def config(*overrides: str) -> Config:
        return load_config(CONFIG, [f"train.steps={args.steps}", f"logdir={args.logdir}", *overrides])

    runs: dict[str, tuple[dict, float, str]] = {}
    print(f"plain loop, {args.steps} steps", flush=True)
    snapshots, rate = plain_run(config(), args.every)
    runs["plain loop"] = (snapshots, rate, f"1 process, {os.cpu_count()} threads")
    for label, overrides in [("system", []), ("system bf16", ["train.autocast=bf16"])][: 2 if args.bf16 else 1]:
        print(f"{label}, {args.steps} steps", flush=True)
        runs[label] = system_run(config(*overrides), args.every)

    results = {}
    for label, (snapshots, rate, layout) in runs.items():
        curve = []
        for step, (seconds, params) in sorted(snapshots.items()):
            mean, ci = accuracy(config(), params, args.val_tasks)
            curve.append({"step": step, "seconds": round(seconds, 1), "val_accuracy": mean, "ci95": ci})
        results[label] = {"layout": layout, "steps_per_hour": round(rate * 3600), "curve": curve}
        print(f"\n{label} ({layout}): {rate * 3600:,.0f} steps/hour")
        for point in curve:
            seconds, acc, ci = point["seconds"], point["val_accuracy"], point["ci95"]
            print(f"  step {point['step']:>6}  {seconds:7.1f} s  val {acc:.3f} ± {ci:.3f}")
    summary = {"config": CONFIG, "cpus": os.cpu_count(), "torch": torch.__version__, "runs": results}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
