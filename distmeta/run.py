"""What a training run is, supervised or meta-RL alike: its name, its outputs checked before it
starts, its result, and the exceptions that say a signal or a failing evaluation stopped it."""

from __future__ import annotations

import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from distmeta.checkpoint import FINAL_NAME, BestCheckpoint, CheckpointStore, checkpoint_location, probe_write
from distmeta.config import Config, ConfigError
from distmeta.report import EvalRow


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: str  # the final parameters
    best_checkpoint: str | None  # the parameters that scored best on the validation split, if it ran
    final_metrics: dict
    eval_rows: list[EvalRow]
    tasks_per_s: float  # steady state, all steps but the first
    train_s: float  # the training steps alone: from the first submission to the last update
    wall_s: float  # everything: actors, training, checkpoint, final evaluation
    recoveries: int  # faults recovered from


class RunInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after the steps in flight; ``checkpoint`` resumes it, or,
    when the signal came in the last logging window (``finished``), is ``final.pt``: training is done
    and only the test evaluation was skipped."""

    def __init__(self, signum: int, step: int, checkpoint: str, run_dir: Path, finished: bool = False):
        self.signum, self.step, self.checkpoint, self.run_dir = signum, step, checkpoint, run_dir
        self.finished = finished
        what = "training finished, the test evaluation skipped" if finished else "stopped"
        super().__init__(f"{signal.Signals(signum).name}: {what} at step {step}; checkpoint {checkpoint}")

    @property
    def what_next(self) -> str:
        if self.finished:
            return f"test with: distmeta evaluate --checkpoint {self.checkpoint}"
        return f"resume with: python launch.py --resume {self.run_dir}"


class EvaluationFailed(RuntimeError):
    """Validation failed ``StepResults.MAX_FAILED_VALIDATIONS`` times in a row, or the test evaluation
    failed: training stopped with a checkpoint, which the message names with what to do next."""


def run_name(cfg: Config) -> str:
    """``run_name``, or a fresh default name: the random suffix keeps runs started in the same
    second (a backgrounded sweep) in folders of their own."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return cfg.run_name or f"{cfg.algorithm.name}-{cfg.task.source}-{stamp}-{secrets.token_hex(3)}"


def checked_outputs(cfg: Config, run_dir: Path, resume: bool) -> CheckpointStore:
    """The run's checkpoint folder, once it and the log folder are known to be writable, and a
    fresh run is known not to overwrite another run's checkpoints."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe_write(run_dir)
    except OSError as err:
        raise ConfigError(f"cannot write the run's logs to {run_dir} ({err}); choose a writable --logdir") from None
    store = CheckpointStore(checkpoint_location(cfg, run_dir))
    store.check_writable()
    if resume:
        return store
    if store.step_files():
        raise ConfigError(
            f"run {run_dir.name} already has checkpoints in {store.location}: continue it with "
            f"`python launch.py --resume {run_dir}`, or give this run another run_name"
        )
    left = sorted({BestCheckpoint.NAME, FINAL_NAME} & set(store.names()))
    if left:  # an earlier run's that stopped before its first periodic checkpoint: not ours to compete with
        raise ConfigError(
            f"run {run_dir.name} already holds {' and '.join(left)} of an earlier run in {store.location}: "
            "give this run another run_name, or move them away"
        )
    return store


def rejected_in_a_row(rejected_steps: list[int], start_step: int) -> int:
    """How many steps just before ``start_step`` were rejected in a row (a resumed run's earlier
    part): where ``train.max_rejected_steps`` counts on from."""
    rejected, run = set(rejected_steps), 0
    while start_step - 1 - run in rejected:
        run += 1
    return run
