"""Meta-RL's TensorBoard scalars and console progress line, each step's ``MetaRLMetrics`` averaged
over ``train.log_every`` steps. The tags (docs/meta_rl.md):

  return/before_adaptation, return/after_adaptation    mean undiscounted episode return
  episode_length/before_adaptation, .../after_adaptation
  policy/entropy                                       the pre-update policy's, per step
  meta_step/kl, meta_step/surrogate_improvement        loss before minus after the meta-step
  meta_step/backtracks, meta_step/accepted             TRPO's line search; the share of steps taken
  throughput/environment_steps_per_s                   every worker's steps over the step's wall time
  time/rollout_s, time/learn_s, time/step_s            the slowest worker's share (episodes before and after
                                                       its inner step, and its meta-gradient terms); the meta-step
  faults/rejected_steps, faults/recovered
  val/return_shots<E>_steps<k>, test/...               held-out returns after k inner steps, E episodes each
                                                       (+ _ci95, _median, _diverged)
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

from distmeta.config import Config
from distmeta.report import duration
from distmeta.rl.local import MetaRLMetrics
from distmeta.runtime.control import Schedule
from distmeta.runtime.monitor import close_with_hparams, run_writer, write_eval_scalars


class MetaRLMonitor:
    def __init__(self, run_dir: Path, cfg: Config, start_step: int = 0, out=sys.stdout, rejected_before: int = 0):
        """``rejected_before``: steps a resumed run's earlier part rejected (its count goes on from there)."""
        self.cfg, self.out, self.schedule = cfg, out, Schedule.of(cfg.train)
        self.writer = run_writer(run_dir, cfg, start_step)
        self.sums: dict[str, float] = defaultdict(float)
        self.window = 0
        self.last_step = start_step
        self.rejected = rejected_before
        self.last_print = time.time()
        self.recent: list[float] = []  # step times since the last fault, for the rate and ETA
        self.latest: MetaRLMetrics | None = None
        self.environment_steps = self.total_s = 0.0

    def record(self, m: MetaRLMetrics, step_s: float) -> None:
        """Step ``m.step``'s metrics, and its wall time on the driver."""
        step = m.step + 1  # the parameters after this many meta-steps
        self.last_step, self.latest = step, m
        if m.rejected:
            self.rejected += 1
            self.writer.add_scalar("faults/rejected_steps", self.rejected, step)
        for tag, value in {
            "return/before_adaptation": m.return_before,
            "return/after_adaptation": m.return_after,
            "episode_length/before_adaptation": m.length_before,
            "episode_length/after_adaptation": m.length_after,
            "policy/entropy": m.entropy,
            "meta_step/kl": m.kl,
            "meta_step/surrogate_improvement": m.loss_before - m.loss_after,
            "meta_step/backtracks": m.backtracks,
            "meta_step/accepted": float(m.accepted),
            "time/rollout_s": m.rollout_s,
            "time/learn_s": m.learn_s,
            "time/step_s": step_s,
            "environment_steps": m.environment_steps,
        }.items():
            self.sums[tag] += value
        self.window += 1
        self.recent.append(step_s)
        self.environment_steps += m.environment_steps
        self.total_s += step_s
        if self.schedule.logs(step):
            self._flush(step)
        if time.time() - self.last_print >= self.cfg.train.print_every_s or step == self.cfg.train.steps:
            self._print(step)

    def _flush(self, step: int) -> None:
        steps = self.sums.pop("environment_steps")
        self.writer.add_scalar("throughput/environment_steps_per_s", steps / self.sums["time/step_s"], step)
        for tag, total in self.sums.items():
            self.writer.add_scalar(tag, total / self.window, step)
        self.sums.clear()
        self.window = 0

    def _print(self, step: int) -> None:
        self.last_print, m, total = time.time(), self.latest, self.cfg.train.steps
        step_s = sum(self.recent[-20:]) / len(self.recent[-20:])
        print(
            f"step {step}/{total} | return {m.return_before:.2f} -> {m.return_after:.2f} | kl {m.kl:.4f}"
            f"{'' if m.accepted else ' (no step)'} | {m.environment_steps / step_s:,.0f} env steps/s | "
            f"{step_s:.2f} s/step (rollouts {m.rollout_s:.2f} s, meta-step {m.learn_s:.2f} s) | "
            f"ETA {duration((total - step) * step_s)}",
            file=self.out,
            flush=True,
        )

    @property
    def environment_steps_per_s(self) -> float:
        return self.environment_steps / self.total_s if self.total_s else float("nan")

    def log_fault(self, step: int, recoveries: int) -> None:
        self.writer.add_scalar("faults/recovered", recoveries, step)
        self.writer.flush()
        self.recent.clear()

    def log_eval(self, step: int, prefix: str, rows: list) -> list:
        write_eval_scalars(self.writer, step, prefix, rows)
        return rows

    def close(self, final_rows=None) -> None:
        close_with_hparams(self.writer, self.cfg, final_rows or [], self.last_step)
