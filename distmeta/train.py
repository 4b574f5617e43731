"""The meta-training driver, top to bottom.

    task generators --tasks--> workers --updates--> parameter server --metrics--> monitor
                                  ^                        |
                                  +------ parameters ------+

Each step is one ``StepControl`` message pushed through the actors by an engine (a compiled Ray
graph or chained actor calls, see runtime/engine.py). The driver submits up to ``max_inflight_steps`` steps
ahead of the metrics it reads, so it never sits on the critical path; the meaning stays
synchronous: step t's update uses exactly the parameters after step t - 1.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

import distmeta
from distmeta.algorithms import initial_parameters
from distmeta.checkpoint import write_checkpoint
from distmeta.config import Config, ConfigError
from distmeta.evaluate import (
    EvalRow,
    check_evaluation,
    evaluate_chunk,
    evaluation_chunks,
    format_rows,
    group_by_shots,
    protocol,
    summarize,
)
from distmeta.runtime.cluster import connect
from distmeta.runtime.control import StepControl
from distmeta.runtime.engine import ENGINES, choose_engine
from distmeta.runtime.monitor import Monitor, duration
from distmeta.runtime.parameter_server import ParameterServer
from distmeta.runtime.task_generator import TaskGenerator, generator_blocks, split_evenly
from distmeta.runtime.worker import Worker
from distmeta.tasks import build_source


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path  # the final parameters
    best_checkpoint: Path | None  # the parameters that scored best on the validation split, if it ran
    final_metrics: dict
    eval_rows: list[EvalRow]
    tasks_per_s: float  # steady state, all steps but the first
    train_s: float  # the training steps alone: from the first submission to the last update
    wall_s: float  # everything: actors, training, checkpoint, final evaluation


def run_name(cfg: Config) -> str:
    return cfg.run_name or f"{cfg.algorithm.name}-{cfg.task.source}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(cfg: Config, run_dir: Path | None = None) -> TrainResult:
    started = time.time()
    run_dir = run_dir or Path(cfg.logdir) / run_name(cfg)
    source = _checked_source(cfg)  # bad data fails here, before Ray starts
    run_dir.mkdir(parents=True, exist_ok=True)
    started_ray = connect(cfg.cluster)
    try:
        return _train(cfg, source, run_dir, started)
    finally:
        if started_ray:
            ray.shutdown()


def _checked_source(cfg: Config):
    """The run's task source, once every split the run samples has been checked at the sizes it
    samples them (training, validation and test episodes)."""
    source = build_source(cfg.task)
    needed = ["train", "test", *(["val"] if cfg.train.eval_every else [])]
    missing = [split for split in needed if split not in source.splits]
    if missing:
        raise ConfigError(
            f"task source {cfg.task.source} has no {' or '.join(missing)} split (it has {', '.join(source.splits)}); "
            + ("set train.eval_every=0 or " if missing == ["val"] else "")
            + "choose another task.split_scheme"
        )
    check_evaluation(cfg, needed[1:])
    return source


def _train(cfg: Config, source, run_dir: Path, started: float) -> TrainResult:
    c, t = cfg.cluster, cfg.train

    initial = initial_parameters(cfg, source)

    # The actors. Workers hold the compute resources; the server and the generators are light.
    shares = split_evenly(t.meta_batch_size, c.num_workers)
    server = ray.remote(ParameterServer).options(num_cpus=0).remote(cfg, initial)
    workers = [
        ray.remote(Worker).options(num_cpus=c.cpus_per_worker, num_gpus=c.gpus_per_worker).remote(cfg, rank)
        for rank in range(c.num_workers)
    ]
    blocks = generator_blocks(c.num_workers, c.num_task_generators)
    generators = [ray.remote(TaskGenerator).options(num_cpus=0).remote(cfg, shares, ranks) for ranks in blocks]
    feeds = [generator for generator, ranks in zip(generators, blocks) for _ in ranks]  # the generator of each rank
    roles = {"parameter server": server, **{f"worker {r}": w for r, w in enumerate(workers)}}
    roles |= {f"task generator {g}": generator for g, generator in enumerate(generators)}
    try:
        train_s, monitor, best, evaluations = _run_steps(cfg, run_dir, server, workers, feeds, shares)
        checkpoint = Path(ray.get(server.save.remote(str(run_dir / "checkpoints" / "final.pt"))))
        final_params = ray.get(server.parameters.remote())
    except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
        dead = [role for role, actor in roles.items() if not _alive(actor)]
        if not dead:
            raise
        raise ActorLost(f"training stopped: {', '.join(dead)} died ({type(err).__name__}); see the Ray logs") from err
    finally:  # also on failure or Ctrl-C: free the workers' resources for whatever runs next
        for actor in [server, *workers, *generators]:
            ray.kill(actor)
    for at, params, pending in evaluations:
        best.offer(at, params, monitor.log_eval(at, "val", _collect_evaluation(cfg, pending)))
    if best.row:
        print(f"best validation {best.row.tag} {best.row.mean:.4f} at step {best.step}: {best.path}", flush=True)
    print(f"checkpoint {checkpoint}; evaluating on {cfg.eval.num_tasks} held-out tasks", flush=True)
    print(protocol(cfg, "test", cfg.eval.num_tasks), flush=True)
    rows = _collect_evaluation(cfg, _submit_evaluation(cfg, final_params, "test", final=True), progress=True)
    monitor.log_eval(t.steps, "test", rows)
    print(format_rows(rows), flush=True)
    monitor.close(rows)
    wall = time.time() - started
    print(f"done in {wall:.1f} s ({train_s:.1f} s training); TensorBoard logs in {run_dir}", flush=True)
    best_path = best.path if best.row else None
    return TrainResult(run_dir, checkpoint, best_path, monitor.latest, rows, monitor.tasks_per_s, train_s, wall)


def _run_steps(cfg: Config, run_dir: Path, server, workers, feeds, shares):
    """The training loop proper; returns (seconds, monitor, best checkpoint, validations still running)."""
    c, t = cfg.cluster, cfg.train
    engine_name = choose_engine(c)
    engine = ENGINES[engine_name](server, workers, feeds, c.max_inflight_steps, c.step_timeout_s)
    monitor = Monitor(run_dir, cfg)
    best = BestCheckpoint(cfg, run_dir / "checkpoints" / "best.pt")
    print(f"run {run_dir} | {engine_name} engine | {c.num_workers} worker(s), tasks {shares} | {t.steps} steps")

    def checkpoint_path(step: int) -> str:
        return str(run_dir / "checkpoints" / f"step_{step:08d}.pt")

    def handle(metrics: dict) -> None:
        monitor.record(metrics)
        if "params" in metrics:  # a snapshot for validation, evaluated off the critical path
            # A copy: the array may be a zero-copy view of a compiled-graph channel buffer, which
            # stays locked (and the graph stalled) while anything still refers to it.
            params = metrics.pop("params").copy()
            evaluations.append((metrics["step"] + 1, params, _submit_evaluation(cfg, params, "val", t.eval_tasks)))

    started = time.time()
    in_flight: deque = deque()
    evaluations: deque[tuple[int, np.ndarray, list]] = deque()
    try:
        for step in range(t.steps):
            done = step + 1
            control = StepControl(
                step,
                checkpoint=checkpoint_path(done) if t.checkpoint_every and done % t.checkpoint_every == 0 else None,
                publish=bool(t.eval_every and done % t.eval_every == 0),
            )
            in_flight.append(engine.submit(control))
            while len(in_flight) > c.max_inflight_steps:
                handle(engine.result(in_flight.popleft(), c.step_timeout_s))
            while evaluations and _ready(evaluations[0][2]):
                at, params, pending = evaluations.popleft()
                best.offer(at, params, monitor.log_eval(at, "val", _collect_evaluation(cfg, pending)))
        while in_flight:
            handle(engine.result(in_flight.popleft(), c.step_timeout_s))
    finally:
        engine.close()
    return time.time() - started, monitor, best, evaluations


class BestCheckpoint:
    """Keeps ``best.pt``: the parameters that scored best on the validation split so far, judged on
    the first evaluation shots after the inner steps they were trained for (``algorithm.inner_steps``
    when evaluated, else the most evaluated): fewest diverged tasks first (a mean over the surviving
    tasks flatters a snapshot where some blew up), then accuracy up or MSE down. On a tie the
    earlier snapshot stays."""

    def __init__(self, cfg: Config, path: Path):
        self.cfg, self.path = cfg, path
        self.row: EvalRow | None = None
        self.step = 0

    def offer(self, step: int, params: np.ndarray, rows: list[EvalRow]) -> None:
        candidates = [r for r in rows if r.shots == rows[0].shots]
        trained = [r for r in candidates if r.steps == self.cfg.algorithm.inner_steps]
        row = trained[0] if trained else max(candidates, key=lambda r: r.steps)
        if not math.isfinite(row.mean) or (self.row is not None and _rank(row) >= _rank(self.row)):
            return
        self.row, self.step = row, step
        state = {
            "params": torch.from_numpy(params),
            "step": step,
            "config": self.cfg.to_dict(),
            "distmeta_version": distmeta.__version__,
            "validation": {"split": "val", "tag": row.tag, "mean": row.mean, "ci95": row.ci95, "tasks": row.tasks},
        }
        write_checkpoint(self.path, state)


def _rank(row: EvalRow) -> tuple[int, float]:
    """Lower is better."""
    return row.diverged, -row.mean if row.metric == "accuracy" else row.mean


class ActorLost(RuntimeError):
    """An actor of the run died; the message names which."""


def _alive(actor, timeout_s: float = 10.0) -> bool:
    try:
        ray.get(actor.__ray_ready__.remote(), timeout=timeout_s)
        return True
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False


def _submit_evaluation(cfg: Config, params, split: str, num_tasks: int | None = None, final: bool = False):
    """Evaluation chunks as Ray tasks: during training one task at zero CPUs in the background; at
    the end one task per chunk with a worker's resources (their actors are gone by then), so the
    chunks spread over the cluster and report progress. Returns [(chunks, result ref)]."""
    c = cfg.cluster
    chunks = evaluation_chunks(cfg, num_tasks)
    gpus = c.gpus_per_worker if final else 0
    remote = ray.remote(evaluate_chunk).options(num_cpus=c.cpus_per_worker if final else 0, num_gpus=gpus)
    params_ref = ray.put(params)
    groups = [[chunk] for chunk in chunks] if final else [chunks]
    return [(group, remote.remote(cfg, params_ref, split, group, "cuda" if gpus else "cpu")) for group in groups]


def _collect_evaluation(cfg: Config, pending: list, progress: bool = False) -> list[EvalRow]:
    refs = [ref for _, ref in pending]
    total, started, done = sum(chunk[2] for group, _ in pending for chunk in group), time.time(), 0
    remaining = list(refs)
    while progress and remaining:  # progress as chunks finish: tasks, rate, ETA
        finished, remaining = ray.wait(remaining, num_returns=1)
        done += sum(chunk[2] for group, ref in pending if ref in finished for chunk in group)
        rate = done / (time.time() - started)
        print(
            f"evaluated {done}/{total} tasks | {rate:.1f} tasks/s | ETA {duration((total - done) / rate)}", flush=True
        )
    chunks = [chunk for group, _ in pending for chunk in group]
    results = [r for part in ray.get(refs) for r in part]
    return summarize(cfg, group_by_shots(chunks, results))


def _ready(pending: list) -> bool:
    refs = [ref for _, ref in pending]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    return len(ready) == len(refs)
