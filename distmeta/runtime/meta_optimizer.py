"""The meta-optimizer: the meta-parameters theta (or one shard's slice of them), the torch optimizer
that steps them, the learning-rate schedule, and what a checkpoint holds of them. No Ray and no
actor messages beyond the updates it reads: the parameter server (one per shard) and each
all-reduce replica hold one.

A step sums the workers' updates, divides by the number of tasks (a task-weighted mean, so uneven
splits count correctly), and takes one optimizer step: Adam on the meta-gradient for the MAML
family, SGD on theta - phi for Reptile (its outer step epsilon, optionally annealed). A step is
applied whole or not at all: if any update holds a NaN or Inf, or their sum overflows, it is
rejected and nothing changes but the step counter.

A shard holds the slice ``bounds`` of the flat vector. Adam and SGD act element by element, so K
shards compute what one optimizer would; they agree on rejecting a step because each worker flags
its whole update as finite or not. ``checkpoint_state`` joins the shards' states into one
checkpoint, which any number of shards resumes from.
"""

from __future__ import annotations

import copy
import random
import time

import numpy as np
import torch

from distmeta.checkpoint import CheckpointError, CheckpointStore, checkpoint_record
from distmeta.config import Config
from distmeta.params import DTYPES
from distmeta.runtime.control import MetaOptimizerStatus, Rejection, StepMetrics, WorkerUpdate


class MetaOptimizer:
    def __init__(self, cfg: Config, start: np.ndarray, size: int | None = None, bounds: tuple[int, int] | None = None):
        """``start``: the parameters of this slice; ``size``: the whole vector's (default: ``start``'s)."""
        self.cfg = cfg
        self.size = len(start) if size is None else size
        self.lo, self.hi = bounds or (0, self.size)
        self.step = 0  # steps done so far (applied or rejected); also the parameter version
        self.rejected_steps: list[int] = []
        self.last_draw = -1  # asynchronous mode: the newest task batch an update came from
        self.restored_from: str | None = None
        opt = cfg.meta_optimizer
        self.theta = torch.nn.Parameter(torch.tensor(start, dtype=DTYPES[cfg.train.dtype]))
        if opt.name == "adam":  # fused: one pass over the vector, 5-7x faster on CPU (benchmarks/ps_capacity.py)
            self.optimizer = torch.optim.Adam([self.theta], lr=opt.lr, fused=True)
        else:
            self.optimizer = torch.optim.SGD([self.theta], lr=opt.lr)

    @classmethod
    def latest(
        cls,
        cfg: Config,
        store: CheckpointStore | None,
        initial: np.ndarray | None,
        size: int,
        bounds: tuple[int, int] | None = None,
    ) -> MetaOptimizer | None:
        """From the newest valid checkpoint in ``store``, else from ``initial`` (this slice's
        initial parameters); None when there is neither."""
        found = store.latest() if store else None
        if found is None and initial is None:
            return None
        lo, hi = bounds or (0, size)
        meta = cls(cfg, initial if initial is not None else np.zeros(hi - lo), size, bounds)
        if found:
            meta.restore(found[1])
            meta.restored_from = store.uri(found[0])
        return meta

    def parameters(self) -> np.ndarray:
        """The parameters now (a view: copy it to keep it past the next step)."""
        return self.theta.detach().numpy()

    def learning_rate(self, step: int) -> float:
        opt = self.cfg.meta_optimizer
        if opt.decay_every:
            return opt.lr * opt.decay_factor ** (step // opt.decay_every)
        if opt.final_lr is None:
            return opt.lr
        # step i of n at i / n of the way, as Reptile's code anneals (its last step is not lost to a 0 rate)
        progress = min(1.0, step / self.cfg.train.steps)
        return opt.lr + (opt.final_lr - opt.lr) * progress

    def next_draw(self) -> int:
        """The task stream's next batch not yet seen in an update (checkpointed as its cursor)."""
        return self.last_draw + 1 if self.cfg.train.mode == "async" else self.step

    def status(self) -> MetaOptimizerStatus:
        """Where it stands: the step due next, the checkpoint it started from, the stream's cursor."""
        return MetaOptimizerStatus(self.step, self.restored_from, self.next_draw(), tuple(self.rejected_steps))

    def check_step(self, step: int, results: tuple[WorkerUpdate, ...] | list[WorkerUpdate]) -> None:
        """Synchronous mode: raise unless ``results`` are all updates for ``step``, the one due next."""
        if step != self.step or any(r.step != step for r in results):
            raise RuntimeError(
                f"parameter server is at step {self.step} but got updates for steps {[r.step for r in results]}"
            )

    def apply(self, results: list[WorkerUpdate] | tuple[WorkerUpdate, ...], scale: float = 1.0) -> StepMetrics:
        """One optimizer step on the task-weighted mean of ``results``' updates (its learning rate
        times ``scale``), unless one holds a NaN or Inf or their sum overflows; the step counts either way."""
        started, step = time.time(), self.step
        num_tasks = sum(r.num_tasks for r in results)
        lr = self.learning_rate(step)
        total = results[0].update.copy()
        for result in results[1:]:
            total += result.update
        bad = [r for r in results if not r.finite]  # each worker checked its whole update
        if not bad and not np.isfinite(total).all():  # finite updates whose sum overflowed
            if (self.lo, self.hi) != (0, self.size):  # the other shards cannot know: stop rather than diverge
                raise FloatingPointError(
                    f"step {step}: the sum of the workers' updates overflowed in parameters {self.lo}..{self.hi - 1}; "
                    "start a new run with a lower meta_optimizer.lr or algorithm.inner_lr (a resume keeps them)"
                )
            bad = list(results)
        rejected = [Rejection(r.rank, (r.first_task, r.first_task + r.num_tasks)) for r in bad]
        if rejected:
            self.rejected_steps.append(step)
        else:
            total /= num_tasks
            for group in self.optimizer.param_groups:
                group["lr"] = lr * scale
            self.theta.grad = torch.from_numpy(total).to(self.theta.dtype)
            self.optimizer.step()
        self.step += 1
        return StepMetrics(
            step,
            lr=lr,
            num_tasks=num_tasks,
            train={name: sum(r.metrics[name] for r in results) / num_tasks for name in results[0].metrics},
            workers=[r.timing for r in results],
            implementation=results[0].implementation,
            apply_started=started,
            rejected=rejected,
        )

    def attach(self, metrics: StepMetrics, publish: bool, checkpoint: str | None) -> StepMetrics:
        """``metrics`` with what the driver asked of the step just taken: the parameters after it
        (``publish``, unless it was rejected) and the state for ``checkpoint``."""
        if publish and not metrics.rejected:
            metrics.params = self.parameters().copy()
        if checkpoint:
            metrics.checkpoint, metrics.state = checkpoint, self.state()
        metrics.apply_finished = time.time()
        return metrics

    def state(self) -> dict:
        """What a checkpoint needs from this slice: its parameters and optimizer state, the step,
        and the task stream's cursor (``checkpoint_state`` joins the shards' into one checkpoint)."""
        return {
            "params": self.theta.detach().clone(),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),  # a snapshot, not the live moments
            "step": self.step,
            # Training draws its randomness from (seed, stream, draw) alone: the cursor next_draw (in
            # asynchronous mode the next batch of the stream not yet seen in an update) is the task
            # stream's whole state. next_step repeats "step" and nothing reads it: it stays, so the
            # file format does. The process RNGs ride along for code that draws from them.
            "task_stream": {"seed": self.cfg.train.seed, "next_step": self.step, "next_draw": self.next_draw()},
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            "rejected_steps": self.rejected_steps,
        }

    def restore(self, state: dict) -> None:
        """Take this slice of a checkpoint's ``state`` (of the whole vector)."""
        if state["params"].numel() != self.size:
            raise CheckpointError(f"checkpoint holds {state['params'].numel()} parameters, this model has {self.size}")
        with torch.no_grad():
            self.theta.copy_(state["params"][self.lo : self.hi])
        self.optimizer.load_state_dict(_slice_optimizer_state(state["optimizer"], self.lo, self.hi))
        self.step, self.rejected_steps = state["step"], list(state.get("rejected_steps", []))
        self.last_draw = state.get("task_stream", {}).get("next_draw", 0) - 1
        rng = state.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])


def checkpoint_state(cfg: Config, parts: list[dict]) -> dict:
    """One checkpoint from the ``state()`` of each slice of the run's parameters, in shard order."""
    if len({part["step"] for part in parts}) != 1:
        raise RuntimeError(f"parameter-server shards are at different steps: {[part['step'] for part in parts]}")
    optimizer = copy.deepcopy(parts[0]["optimizer"])
    for index, values in optimizer["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value) and value.dim() > 0:  # per parameter (not Adam's step count)
                values[key] = torch.cat([part["optimizer"]["state"][index][key] for part in parts])
    joined = parts[0] | {"optimizer": optimizer}
    return joined | checkpoint_record(cfg, torch.cat([part["params"] for part in parts]), parts[0]["step"])


def _slice_optimizer_state(state: dict, lo: int, hi: int) -> dict:
    """An optimizer state dict for the whole vector, cut to the slice [lo, hi)."""
    state = copy.copy(state)
    state["state"] = {
        index: {k: v[lo:hi].clone() if torch.is_tensor(v) and v.dim() > 0 else v for k, v in values.items()}
        for index, values in state["state"].items()
    }
    return state
