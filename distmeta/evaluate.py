"""Evaluation on held-out tasks: adapt, score after each inner step, and summarise honestly.

Held-out tasks come in chunks, each rebuilt from (eval seed, split, chunk index), so ``evaluate`` in
this process and ``submit_evaluation``'s Ray tasks across the cluster give the same numbers: a mean
with its 95% confidence interval, the median, and the number of diverged tasks (README, "Evaluation
protocol").
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import NamedTuple, TextIO

import numpy as np
import torch

from distmeta.algorithms import ALGORITHMS, build_learner
from distmeta.config import Config, ConfigError
from distmeta.models import MODELS, DataSpec
from distmeta.params import ParamLayout
from distmeta.report import EvalRow, report_progress, scored_row
from distmeta.runtime.worker import ScoreTrajectory, Worker
from distmeta.tasks import SOURCES, build_source, task_rng

CHUNK_TASKS = 100


class EvalChunk(NamedTuple):
    """A chunk of held-out tasks, rebuilt from (eval seed, split, ``index``) wherever it runs."""

    shots: int
    index: int
    num_tasks: int


def evaluation_chunks(cfg: Config, num_tasks: int | None = None) -> list[EvalChunk]:
    """The chunks of an evaluation of ``num_tasks`` tasks (default ``eval.num_tasks``). Chunk i holds
    the same task functions for every shots value, so K = 5, 10, 20 are compared on the same tasks."""
    num_tasks = num_tasks or cfg.eval.num_tasks
    shots_list = eval_shots(cfg)
    sizes = [min(CHUNK_TASKS, num_tasks - start) for start in range(0, num_tasks, CHUNK_TASKS)]
    return [EvalChunk(shots, index, size) for shots in shots_list for index, size in enumerate(sizes)]


def summarize(cfg: Config, trajectories: dict[int, list[ScoreTrajectory]]) -> list[EvalRow]:
    """``trajectories[shots]``: chunks of per-task scores ``[T, steps + 1]`` -> one row per (shots, steps)."""
    regression = SOURCES[cfg.task.source].kind == "regression"
    rows = []
    for shots, chunks in trajectories.items():
        loss = np.concatenate([c.loss for c in chunks])
        values = loss if regression else np.concatenate([c.accuracy for c in chunks])
        for steps in eval_steps(cfg):
            diverged = ~np.isfinite(loss[:, steps]) | (loss[:, steps] > cfg.eval.divergence_factor * loss[:, 0])
            rows.append(
                scored_row(
                    values[:, steps],
                    int(diverged.sum()),
                    ways=0 if regression else cfg.eval.ways or cfg.task.ways,
                    shots=shots,
                    steps=steps,
                    metric="mse" if regression else "accuracy",
                )
            )
    return rows


def eval_shots(cfg: Config) -> list[int]:
    """The support sizes evaluation uses: ``eval.shots``, or the training shots."""
    return cfg.eval.shots or [cfg.task.shots]


def eval_steps(cfg: Config) -> list[int]:
    """The inner-step counts evaluation scores after: ``eval.inner_steps``, or the algorithm's default."""
    return cfg.eval.inner_steps or ([1, 5, 10] if ALGORITHMS[cfg.algorithm.name].adaptive else [0])


def eval_source(cfg: Config):
    """The task source of held-out episodes: the run's, with ``eval.ways`` classes per episode."""
    return build_source(replace(cfg.task, ways=cfg.eval.ways or cfg.task.ways))


def check_evaluation(cfg: Config, splits: list[str]) -> None:
    """Raise before any work if the held-out episodes of ``splits`` cannot be built."""
    source = eval_source(cfg)
    for split in splits:
        for shots in eval_shots(cfg):
            source.check(split, shots, cfg.eval.queries)


def check_device(device: str) -> None:
    """Raise a ``ConfigError`` now if torch cannot use ``device`` (a CPU-only torch given cuda,
    a GPU index past the last, a typo), rather than a traceback from deep in the model."""
    try:
        torch.empty(1, device=torch.device(device))
    except (RuntimeError, AssertionError) as err:  # torch built without CUDA raises AssertionError
        hint = (
            f"torch {torch.__version__} sees no CUDA GPU (built for CUDA {torch.version.cuda or 'none'}, "
            f"{torch.cuda.device_count()} device(s) visible)"
            if str(device).startswith("cuda")
            else str(err).split(". ")[0][:200]
        )
        raise ConfigError(f"--device {device} cannot be used: {hint}; use --device cpu") from None


def on_other_data(
    cfg: Config, num_params: int, shards: str, split: str, scheme: str | None = None
) -> tuple[Config, tuple[DataSpec, str]]:
    """``cfg`` with its held-out episodes drawn from the shards at ``shards``, another dataset than
    the one it was trained on (cross-domain transfer): from their split ``<scheme>/<split>``, where
    the scheme is ``scheme``, else the training scheme if those shards have it, else their only one.
    The images must have the shape the model was trained on. Also returns what the model (of
    ``num_params`` parameters) was built for (``evaluate``'s ``model_data``): the new data cannot say
    (the baseline's head has one output per training class)."""
    from distmeta.data.shards import read_manifest

    kind = SOURCES[cfg.task.source].kind
    if kind != "classification":
        raise ConfigError(
            f"--shards: the checkpoint was trained on {cfg.task.source} ({kind}); it classifies no images"
        )
    manifest = read_manifest(shards)
    trained = cfg.task.image_format
    shape = tuple(manifest["image_shape"])
    if trained.channels and shape != (trained.channels, trained.height, trained.width):
        raise ConfigError(
            f"--shards {shards} holds images of shape {list(shape)}, the checkpoint's model takes "
            f"{[trained.channels, trained.height, trained.width]}: build them at that size (distmeta data build ...)"
        )
    schemes = sorted({name.split("/")[0] for name in manifest["splits"]})
    if scheme is None:
        if f"{cfg.task.split_scheme}/{split}" in manifest["splits"]:
            scheme = cfg.task.split_scheme
        elif len(schemes) == 1:
            scheme = schemes[0]
        else:
            raise ConfigError(f"--shards {shards} has the split schemes {schemes}: choose one with --split-scheme")
    if f"{scheme}/{split}" not in manifest["splits"]:
        held = sorted(n for n in manifest["splits"] if n.startswith(f"{scheme}/"))
        raise ConfigError(
            f"--shards {shards} has no split {scheme}/{split} (it has {', '.join(held) or 'none of that scheme'})"
        )
    model_data = trained_model_data(cfg, num_params)
    ways = cfg.eval.ways or cfg.task.ways  # the training episodes' shape means nothing on this data
    task = replace(
        cfg.task,
        source="shards",
        shards=str(shards),
        split_scheme=scheme,
        rotations=False,
        shards_fingerprint="",
        train_with_val=False,  # its training classes are the checkpoint's: this data's are never sampled
    )
    task = replace(task, ways=ways)
    return replace(cfg, task=task, eval=replace(cfg.eval, ways=0)), model_data


def trained_model_data(cfg: Config, num_params: int) -> tuple[DataSpec, str]:
    """The spec and kind a checkpoint's model (``num_params`` parameters) was built for, from its
    recorded image format: a head of the training episodes' ways, or for a head over every training
    class (``task.labels=class``: the baseline) as many outputs as the parameters hold, so no
    training data is needed; none when they hold none (an export: ``without_training_head``). A
    checkpoint that records no format: from its training data."""
    fmt = cfg.task.image_format
    if not fmt.channels:
        source = build_source(cfg.task)
        return source.spec, source.kind
    shape = (fmt.channels, fmt.height, fmt.width)
    if cfg.task.labels != "class":
        return DataSpec(shape, cfg.task.ways), "classification"
    if num_params == _num_params(cfg, DataSpec(shape, 0)):
        return DataSpec(shape, 0), "classification"
    # the parameter count grows by the same amount with every output the head has
    one, two = (_num_params(cfg, DataSpec(shape, outputs)) for outputs in (1, 2))
    extra_outputs, rest = divmod(num_params - one, two - one) if two > one else (-1, 0)
    if rest or extra_outputs < 0:
        raise ConfigError(
            f"the checkpoint holds {num_params} parameters, which no {cfg.model.name} head over the training "
            f"classes of {shape} images has (its config does not match its parameters): re-export it from its run"
        )
    return DataSpec(shape, extra_outputs + 1), "classification"


def without_training_head(cfg: Config, flat: np.ndarray) -> np.ndarray:
    """The parameters of a model trained over every training class (``task.labels=class``: the
    baseline) without that head, which its tests replace (by a head at the support set's class
    centroids, or at zero): what ``distmeta checkpoint export`` keeps of it. Others: ``flat``."""
    if cfg.task.labels != "class" or not cfg.task.image_format.channels:  # without a format: sized by its data
        return flat
    named = _layout(cfg, trained_model_data(cfg, flat.size)[0]).unflatten(torch.from_numpy(flat))
    body = {name: value for name, value in named.items() if not name.startswith("head.")}
    return ParamLayout.of(body).flatten(body).numpy()


def _num_params(cfg: Config, spec: DataSpec) -> int:
    return _layout(cfg, spec).size


def _layout(cfg: Config, spec: DataSpec) -> ParamLayout:
    with torch.random.fork_rng(devices=[]):  # building initialises: the caller's random stream stays as it was
        learner = build_learner(cfg, spec, "classification", torch.device("cpu"))
    return ParamLayout.of(learner.initial_parameters())


def protocol(cfg: Config, split: str, num_tasks: int) -> str:
    """The evaluation protocol in one line, printed with every result so it can be reproduced."""
    e, a = cfg.eval, cfg.algorithm
    line = f"protocol: {num_tasks} {split} episodes (seed {e.seed})"
    if SOURCES[cfg.task.source].kind == "classification":
        line += f", {e.ways or cfg.task.ways}-way, shots {eval_shots(cfg)}, {e.queries} queries per class"
    else:
        line += f", shots {eval_shots(cfg)}, {e.queries} queries"
    learner = ALGORITHMS[a.name]
    if learner.adaptive:
        batch = f"mini-batches of {e.inner_batch_size}" if e.inner_batch_size else "the whole support set"
        lr = "learned per-parameter rates" if learner.learned_inner_lr else f"lr {a.inner_lr}"
        line += f", inner steps {eval_steps(cfg)} ({a.inner_optimizer}, {lr}, on {batch})"
    if learner.supervised:  # the test-time settings a command line may change
        start = "the support set's class centroids" if a.head_init == "centroid" else "zero"
        head = "cosine head (Baseline++)" if cfg.model.head == "cosine" else "head"
        line += f", a new {head} from {start}, its steps training {'the head' if a.finetune == 'head' else 'all'}"
    if MODELS[cfg.model.name].batch_norm:
        together = "the query set" if learner.adaptive else "each episode's support and query sets"
        line += ", batch statistics " + (
            f"over {together} (transductive)"
            if e.transductive
            else "of the support set plus one query (non-transductive)"
        )
    return line


def evaluate_chunk(
    cfg: Config,
    flat_params: np.ndarray,
    split: str,
    chunks: list[EvalChunk],
    device: str | None = None,
    progress: TextIO | None = None,
    model_data: tuple[DataSpec, str] | None = None,
) -> list[ScoreTrajectory]:
    """Per-task query scores after 0..max(eval_steps) inner steps, for each chunk; with
    ``progress``, a progress line there after each chunk (``report_progress``). ``model_data``: the
    spec and kind the model was built for, when the episodes come from other data (``on_other_data``);
    for a model over every training class (the baseline) it is read off the parameters, as an export
    leaves its head out."""
    if model_data is None and cfg.task.labels == "class":
        model_data = trained_model_data(cfg, flat_params.size)
    worker = Worker(cfg, device=torch.device(device) if device else None, data=model_data)
    source = eval_source(cfg)
    results = []
    started, total, done = time.time(), sum(chunk.num_tasks for chunk in chunks), 0
    for shots, index, size in chunks:
        tasks = source.sample(task_rng(cfg.eval.seed, split, index), size, split, shots, cfg.eval.queries)
        results.append(worker.evaluate(flat_params, tasks, eval_steps(cfg)))
        done += size
        if progress is not None:
            report_progress(progress, done, total, started)
    return results


def evaluate(
    cfg: Config,
    flat_params: np.ndarray,
    split: str = "test",
    device: str = "cpu",
    progress: TextIO | None = None,
    model_data: tuple[DataSpec, str] | None = None,
) -> list[EvalRow]:
    """Evaluate meta-parameters in this process (no Ray); ``progress``: where to report tasks
    done, rate and ETA (``report_progress``), if anywhere; ``model_data``: as ``evaluate_chunk``."""
    check_device(device)
    check_evaluation(cfg, [split])
    chunks = evaluation_chunks(cfg)
    results = evaluate_chunk(cfg, flat_params, split, chunks, device, progress, model_data)
    return summarize(cfg, group_by_shots(chunks, results))


def group_by_shots(chunks: list[EvalChunk], results: list[ScoreTrajectory]) -> dict[int, list[ScoreTrajectory]]:
    trajectories: dict[int, list[ScoreTrajectory]] = {}
    for chunk, result in zip(chunks, results):
        trajectories.setdefault(chunk.shots, []).append(result)
    return trajectories


def submit_evaluation(cfg: Config, params, split: str, num_tasks: int | None = None, final: bool = False):
    """Evaluation chunks as Ray tasks: during training one task at zero CPUs in the background; at
    the end one task per chunk with a worker's resources (their actors are gone by then), so the
    chunks spread over the cluster and report progress. Returns [(chunks, result ref)]."""
    import ray  # here: evaluation in this process (distmeta evaluate) runs without it

    c = cfg.cluster
    chunks = evaluation_chunks(cfg, num_tasks)
    gpus = c.gpus_per_worker if final else 0
    remote = ray.remote(evaluate_chunk).options(num_cpus=c.cpus_per_worker if final else 0, num_gpus=gpus)
    params_ref = ray.put(params)
    groups = [[chunk] for chunk in chunks] if final else [chunks]
    device = None if gpus else "cpu"  # None: the GPU Ray assigns (or the CPU, with cluster.cpu_fallback)
    return [(group, remote.remote(cfg, params_ref, split, group, device)) for group in groups]


def collect_evaluation(
    cfg: Config, pending: list, progress: TextIO | None = None, timeout_s: float | None = None
) -> list[EvalRow]:
    """The rows of the evaluation ``submit_evaluation`` started (waiting for it); with ``progress``,
    a progress line there as its chunks finish (``report_progress``). Past ``timeout_s`` the chunks
    still running are cancelled and ``GetTimeoutError`` raised."""
    import ray

    refs = [ref for _, ref in pending]
    total, started, done = sum(chunk.num_tasks for group, _ in pending for chunk in group), time.time(), 0
    remaining = list(refs)
    while progress is not None and remaining:  # progress as chunks finish: tasks, rate, ETA
        finished, remaining = ray.wait(remaining, num_returns=1)
        done += sum(chunk.num_tasks for group, ref in pending if ref in finished for chunk in group)
        report_progress(progress, done, total, started)
    chunks = [chunk for group, _ in pending for chunk in group]
    try:
        results = [r for part in ray.get(refs, timeout=timeout_s) for r in part]
    except ray.exceptions.GetTimeoutError:
        for ref in refs:  # a finished one is left as it is
            ray.cancel(ref, force=True)
        raise ray.exceptions.GetTimeoutError(
            f"the evaluation did not finish within {timeout_s:g} s; its tasks were cancelled"
        ) from None
    return summarize(cfg, group_by_shots(chunks, results))


def evaluation_ready(pending: list) -> bool:
    """Whether every chunk of an evaluation ``submit_evaluation`` started has finished."""
    import ray

    refs = [ref for _, ref in pending]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    return len(ready) == len(refs)
