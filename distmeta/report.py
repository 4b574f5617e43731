"""What runs report, supervised or meta-RL alike: an evaluation's ``EvalRow`` per (shots, inner
steps), the mean over held-out tasks with its 95% confidence interval, the median and the tasks
that diverged (``format_rows`` prints them as a table), and long work's progress (rate, ETA).
Plain numbers and text only: no component, no Ray."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TextIO

import numpy as np

HIGHER_IS_BETTER = {"accuracy": True, "return": True, "mse": False}


@dataclass
class EvalRow:
    ways: int  # classes per episode; 0 for regression and meta-RL
    shots: int  # support examples per class (per task for regression); meta-RL: episodes per inner step
    steps: int
    metric: str  # "mse" (regression), "accuracy" (classification) or "return" (meta-RL)
    mean: float
    ci95: float
    median: float
    diverged: int
    tasks: int

    @property
    def tag(self) -> str:
        """Its TensorBoard name, e.g. ``accuracy_5way_shots1_steps3``, ``mse_shots10_steps1`` or
        ``return_shots40_steps2``."""
        ways = f"{self.ways}way_" if self.ways else ""
        return f"{self.metric}_{ways}shots{self.shots}_steps{self.steps}"


def scored_row(values: np.ndarray, diverged: int, **row) -> EvalRow:
    """A row from the tasks' scores ``values`` [tasks]: their mean, the half-width of its normal 95%
    interval (1.96 sample standard deviations over sqrt(tasks)), and the median. A score that is not
    finite (a regression that blew up, a NaN) counts as the worst there is, +inf MSE or -inf
    accuracy and return: it swamps the mean, as it should, and sorts last for the median, which
    stays finite while fewer than half the tasks have diverged; the interval is then undefined (NaN)."""
    worst = -math.inf if HIGHER_IS_BETTER[row["metric"]] else math.inf
    values = np.where(np.isfinite(values), values, worst)
    bounded = len(values) > 1 and np.isfinite(values).all()
    ci95 = 1.96 * values.std(ddof=1) / math.sqrt(len(values)) if bounded else math.nan
    mean, median = (float(values.mean()), float(np.median(values))) if len(values) else (math.nan, math.nan)
    return EvalRow(**row, mean=mean, ci95=float(ci95), median=median, diverged=diverged, tasks=len(values))


def format_rows(rows: list[EvalRow]) -> str:
    shots = "episodes" if rows and rows[0].metric == "return" else "shots"  # meta-RL's data per inner step
    width = len(shots)
    header = (shots, "steps", "metric", "mean", "± 95% CI", "median", "diverged", "tasks")
    lines = [f"{{:>{width}}} {{:>5}}  {{:<8}} {{:>9}} {{:>9}} {{:>9}} {{:>8}} {{:>6}}".format(*header)]
    for r in rows:
        lines.append(
            f"{r.shots:>{width}} {r.steps:>5}  {r.metric:<8} {_number(r.mean)} {_number(r.ci95)} {_number(r.median)} "
            f"{r.diverged:>8} {r.tasks:>6}"
        )
    return "\n".join(lines)


def _number(x: float) -> str:
    """Nine characters: fixed point, or scientific once a diverged task has swamped a mean."""
    return f"{x:>9.4f}" if abs(x) < 1e4 or not math.isfinite(x) else f"{x:>9.2e}"


def print_now(message: str) -> None:
    """A progress line, flushed: a long job whose output goes to a pipe or a log shows as it goes."""
    print(message, flush=True)


def report_progress(out: TextIO, done: int, total: int, started: float) -> None:
    """An evaluation's progress line on ``out``: tasks done of ``total`` since ``started``
    (time.time()), rate, ETA. The caller picks the stream: training prints it to stdout, the run's
    log, beside the training progress line; ``distmeta evaluate`` to stderr, as its stdout holds
    only the protocol and the numbers, which a seed pins exactly."""
    rate = done / (time.time() - started)
    eta = duration((total - done) / rate)
    print(f"evaluated {done}/{total} tasks | {rate:.1f} tasks/s | ETA {eta}", file=out, flush=True)


def duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
