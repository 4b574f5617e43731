"""Parameter server: owns the meta-parameters and the meta-optimizer.

Each step it sums the workers' updates, divides by the number of tasks (a task-weighted mean, so
uneven splits count correctly), and takes one optimizer step: Adam on the meta-gradient for the
MAML family, SGD on theta - phi for Reptile (its outer step epsilon, optionally annealed).
"""

from __future__ import annotations

import time

import numpy as np
import torch

import distmeta
from distmeta.checkpoint import write_checkpoint
from distmeta.config import Config
from distmeta.params import DTYPES
from distmeta.runtime.control import StepControl


class ParameterServer:
    def __init__(self, cfg: Config, initial_params: np.ndarray):
        self.cfg = cfg
        self.theta = torch.nn.Parameter(torch.tensor(initial_params, dtype=DTYPES[cfg.train.dtype]))
        opt = cfg.meta_optimizer
        if opt.name == "adam":
            self.optimizer = torch.optim.Adam([self.theta], lr=opt.lr)
        else:
            self.optimizer = torch.optim.SGD([self.theta], lr=opt.lr)
        self.step = 0  # updates applied so far; also the parameter version

    def parameters(self, control: StepControl | None = None) -> np.ndarray:
        """The current meta-parameters (``control`` only orders this call within a step)."""
        return self.theta.detach().numpy()

    def learning_rate(self, step: int) -> float:
        opt = self.cfg.meta_optimizer
        if opt.decay_every:
            return opt.lr * opt.decay_factor ** (step // opt.decay_every)
        if opt.final_lr is None:
            return opt.lr
        progress = min(1.0, step / max(1, self.cfg.train.steps - 1))
        return opt.lr + (opt.final_lr - opt.lr) * progress

    def apply(self, control: StepControl, *results: dict) -> dict:
        """Aggregate the workers' results for ``control.step``, apply them, return the step's metrics."""
        started, step = time.time(), control.step
        if step != self.step or any(r["step"] != step for r in results):
            raise RuntimeError(
                f"parameter server is at step {self.step} but got updates for steps {[r['step'] for r in results]}"
            )
        num_tasks = sum(r["num_tasks"] for r in results)
        total = np.zeros_like(results[0]["update"])
        for result in results:
            if not np.isfinite(result["update"]).all():
                raise FloatingPointError(
                    f"worker {result['rank']} sent a non-finite update at step {step}; it was not applied. "
                    "Lower algorithm.inner_lr or meta_optimizer.lr"
                )
            total += result["update"]
        lr = self.learning_rate(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.theta.grad = torch.from_numpy(total / num_tasks).to(self.theta.dtype)
        self.optimizer.step()
        self.step += 1
        metric_names = results[0]["metrics"]
        metrics = {
            "step": step,
            "lr": lr,
            "num_tasks": num_tasks,
            "train": {name: sum(r["metrics"][name] for r in results) / num_tasks for name in metric_names},
            "workers": [
                {k: r[k] for k in ("rank", "num_tasks", "produced_at", "started", "finished")} for r in results
            ],
            "implementation": results[0]["implementation"],
            "apply_started": started,
        }
        if control.publish:
            metrics["params"] = self.theta.detach().numpy().copy()
        if control.checkpoint:
            self.save(control.checkpoint)
        metrics["apply_finished"] = time.time()
        return metrics

    def save(self, path: str) -> str:
        """Write a checkpoint atomically (temporary file, fsync, rename); returns its path."""
        state = {
            "params": self.theta.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "config": self.cfg.to_dict(),
            "distmeta_version": distmeta.__version__,
        }
        return write_checkpoint(path, state)
