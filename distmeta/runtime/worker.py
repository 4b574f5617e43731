"""Worker: adapts its share of each step's meta-batch on its own device and returns one update.

A plain class, so the same code runs in-process (benchmarks, tests) and as a Ray actor (training).
The update it returns is the SUM over its tasks plus the task count; the parameter server divides
by the total, so a step's result does not depend on how the batch was split. With the parameters
split across K server shards it takes their K slices and returns K results, one per shard. In
all-reduce mode it also holds a copy of the meta-parameters and sums updates with the other
workers (its ``GroupMember`` methods, runtime/allreduce.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import logging
import os
import time

import numpy as np
import torch

from distmeta.algorithms import build_learner, fastest_implementation
from distmeta.config import Config, ConfigError, TrainConfig
from distmeta.models import DataSpec
from distmeta.params import DTYPES, ParamLayout, shard_bounds
from distmeta.runtime.allreduce import GroupMember
from distmeta.runtime.control import StepControl, WorkerTiming, WorkerUpdate
from distmeta.runtime.task_generator import TaskGenerator
from distmeta.tasks import TaskBatch, build_source
from distmeta.tasks.batch import to_tensor

log = logging.getLogger(__name__)


def worker_device(gpus: float, cpus: float, cpu_fallback: bool = False) -> torch.device:
    """The GPU Ray assigned (it sets CUDA_VISIBLE_DEVICES, so it is cuda:0), else the CPU with
    torch threads limited to this worker's CPU share so workers do not oversubscribe cores."""
    if gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())  # an index: NCCL's process group needs one
    if gpus > 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        problem = (
            f"this worker was given {gpus:g} GPU(s) by Ray (CUDA_VISIBLE_DEVICES={visible!r}) "
            f"but torch {torch.__version__} sees no CUDA device"
        )
        if not cpu_fallback:
            raise RuntimeError(
                f"{problem}; install a CUDA build of torch on the worker nodes, set cluster.gpus_per_worker=0, "
                "or (to try a config on fake GPUs) cluster.cpu_fallback=true"
            )
        _warn_once(f"{problem}: running on the CPU (cluster.cpu_fallback=true)")
    torch.set_num_threads(max(1, int(cpus)))
    return torch.device("cpu")


def gpu_numerics(train: TrainConfig) -> None:
    """What float32 and a rerun mean on this process's GPU: ``train.tf32`` and
    ``train.deterministic`` (config.py). PyTorch's defaults (TF32 convolutions, cuDNN's autotuned
    and atomic kernels) would make a GPU run another math than its float64 checks and a resumed
    run drift from the uninterrupted one."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = train.tf32
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = train.deterministic, not train.deterministic
    if train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any product
    # warn_only: an op with no deterministic CUDA kernel warns (naming itself) instead of stopping the run
    torch.use_deterministic_algorithms(train.deterministic, warn_only=True)
    # the mode would also fill every new tensor (a cost each step) to expose reads of unset memory; none here
    torch.utils.deterministic.fill_uninitialized_memory = False


@contextlib.contextmanager
def gpu_numerics_within(train: TrainConfig):
    """``gpu_numerics`` for a block alone, the process's own settings back after it: what a library
    call (``distmeta.adapt``) owes the program that called it."""
    matmul, cudnn, memory = torch.backends.cuda.matmul, torch.backends.cudnn, torch.utils.deterministic
    flags = (matmul.allow_tf32, cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark)
    algorithms = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    fill = memory.fill_uninitialized_memory
    gpu_numerics(train)
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark = flags
        torch.use_deterministic_algorithms(algorithms[0], warn_only=algorithms[1])
        memory.fill_uninitialized_memory = fill


# Evaluation passes hold at most about this many examples (support and query sets of whole tasks):
# 2,000 Omniglot images keep Conv4-64's activations near 2 GB; a chunk of 100 five-way tasks at
# once held 7 to 12 GB, and Ray's memory monitor killed actors on the 24 GiB machine.
EVAL_EXAMPLES_PER_PASS = 2000

# glibc malloc settings for a CPU worker's process, by their tunable names, with the mallopt
# option (malloc.h) that sets each one in a running process
MALLOC_SETTINGS = {
    "trim_threshold": (-1, 1 << 30),  # M_TRIM_THRESHOLD: keep up to 1 GB of freed heap top
    "top_pad": (-2, 256 << 20),  # M_TOP_PAD: grow the heap 256 MB at a time
    "mmap_max": (-4, 0),  # M_MMAP_MAX: no block gets an mmap of its own, to be unmapped on free
    "arena_max": (-8, 1),  # M_ARENA_MAX: every thread allocates from that one heap
}


@functools.cache
def keep_freed_memory() -> bool:
    """Make this process's malloc keep the memory a step frees for the next step (glibc only).
    By default glibc serves blocks above 128 KB (adapting up to 32 MB, the most it allows) with
    fresh mmaps and gives freed heap tops back to the OS, so every CPU step faults in and zeroes
    its activations anew: 160,000 page faults and half of a ProtoNets 60-way step's 0.53 s here;
    13,000 and 0.29 s with these settings. In a running process they hold for its main thread's
    heap; a Ray worker computes on a thread of its own, so it gets them at its start from
    ``worker_process_env``. Returns whether they were set."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(option, value) == 1 for option, value in MALLOC_SETTINGS.values())
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator is left as it is
        return False


def worker_process_env() -> dict[str, str]:
    """``MALLOC_SETTINGS`` as glibc reads them when a process starts, for a CPU worker actor's
    environment. A compiled graph runs the worker's steps on a thread of Ray's, which allocates
    from an arena of its own: heaps of at most 64 MB that ``mallopt`` does not reach once made, so
    each activation above that size (mini-ImageNet's first layer: 72 MB) was mmapped and unmapped
    every step, 100,000 page faults a second per worker. Other platforms ignore the variable."""
    return {"GLIBC_TUNABLES": ":".join(f"glibc.malloc.{name}={v}" for name, (_, v) in MALLOC_SETTINGS.items())}


@functools.cache
def _native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX); asked once, not every step."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


@functools.cache
def _warn_once(message: str) -> None:
    """Once per process: a worker and the evaluation chunks after it share the process."""
    log.warning(message)


def step_seconds(cfg: Config, above_s: float) -> float:
    """About how long one single-threaded CPU worker takes for a whole training step of ``cfg``,
    timed here on real tasks after a warm-up: one task, times the meta-batch if that one task
    alone takes ``above_s`` or more; else the whole meta-batch, the faster implementation (a
    step of small tasks costs far less than its tasks one by one). ``plan_layout`` splits a
    meta-batch over several workers only when this outweighs what each worker adds per step."""
    size = cfg.train.meta_batch_size
    worker = Worker(cfg, device=torch.device("cpu"))
    params = worker.algorithm.initial_parameters()
    batch = TaskGenerator(cfg, [size], [0], prefetch=False).build(0)[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = batch.slice(0, 1).to_torch(worker.device, worker.dtype)
        _, timings = fastest_implementation(worker.algorithm, params, one, repeats=1, implementations=("loop",))
        if timings["loop"] >= above_s or size == 1:
            return size * timings["loop"]
        tasks = batch.to_torch(worker.device, worker.dtype)
        return min(fastest_implementation(worker.algorithm, params, tasks, repeats=1)[1].values())
    finally:
        torch.set_num_threads(threads)


@dataclasses.dataclass(frozen=True)
class ScoreTrajectory:
    """``Worker.evaluate``'s answer: per-task query scores after 0, 1, ..., max inner steps,
    ``[T, max + 1]`` each, NaN after the steps not scored (numpy: Ray moves them zero-copy)."""

    loss: np.ndarray
    accuracy: np.ndarray | None = None  # classification only


class Worker(GroupMember):
    def __init__(
        self, cfg: Config, rank: int = 0, device: torch.device | None = None, data: tuple[DataSpec, str] | None = None
    ):
        """``data``: the task source's spec and kind, which the driver has already; without it the
        worker makes the source to learn them (for shards: opens the dataset)."""
        self.cfg, self.rank = cfg, rank
        c = cfg.cluster
        self.device = device or worker_device(c.gpus_per_worker, c.cpus_per_worker, c.cpu_fallback)
        if cfg.algorithm.implementation == "threads" and self.device.type != "cpu":  # gpus_per_worker=auto found a GPU
            raise ConfigError(
                f"algorithm.implementation=threads splits a worker's tasks over CPU cores; this worker "
                f"computes on {self.device}: use auto, vmap or loop, or cluster.gpus_per_worker=0"
            )
        if self.device.type == "cpu":
            keep_freed_memory()
        elif self.device.type == "cuda":
            gpu_numerics(cfg.train)
        self.dtype = DTYPES[cfg.train.dtype]
        if data is None:
            source = build_source(cfg.task)
            data = source.spec, source.kind
        self.algorithm = build_learner(cfg, *data, self.device, self.dtype)
        self.layout = ParamLayout.of(self.algorithm.initial_parameters())
        self.shards = shard_bounds(self.layout.size, cfg.cluster.server_shards)
        self.implementation = cfg.algorithm.implementation

    def _params(self, flat: np.ndarray) -> dict[str, torch.Tensor]:
        return self.layout.unflatten(to_tensor(flat, self.device, self.dtype))  # on a GPU: no host sync

    def compute(
        self, control: StepControl, tasks: TaskBatch, *params: np.ndarray
    ) -> WorkerUpdate | tuple[WorkerUpdate, ...]:
        """The update of ``tasks`` at the parameters ``params`` (one slice per server shard): one
        result, or with several shards a tuple of results holding their slice of the update each."""
        started = time.time()
        flat = params[0] if len(params) == 1 else np.concatenate(params)
        named = self._params(flat)
        task_tensors = tasks.to_torch(self.device, self.dtype)
        if self.implementation == "auto" and control.implementation:  # started after the run chose (a recovery)
            self.implementation = control.implementation
        with self.precision():
            if self.implementation == "auto":
                self.implementation, timings = fastest_implementation(self.algorithm, named, task_tensors)
                log.info("worker %d: %s is fastest on %s (%s)", self.rank, self.implementation, self.device, timings)
            update, sums = self.algorithm.batch_sums(named, task_tensors, self.implementation, control.score_before)
        # the update and the metrics come to the host in one copy: a GPU step's only sync
        names = list(sums)
        metric_values = torch.stack([sums[n].detach().to(self.dtype) for n in names])
        host = torch.cat([self.layout.flatten(update).detach(), metric_values]).cpu().numpy()
        update, metrics = host[: self.layout.size], dict(zip(names, host[self.layout.size :].tolist()))
        result = WorkerUpdate(
            step=control.step,
            generation=control.generation,
            draw=tasks.draw,
            update=update,
            finite=bool(np.isfinite(update).all()),
            first_task=tasks.first_task,
            metrics=metrics,
            implementation=self.implementation,
            timing=WorkerTiming(self.rank, len(tasks), tasks.produced_at, started, time.time()),
        )
        if len(self.shards) == 1:
            return result
        return tuple(dataclasses.replace(result, update=update[lo:hi]) for lo, hi in self.shards)

    def precision(self):
        """The training step's precision context: bfloat16 autocast with ``train.autocast=bf16``."""
        if self.cfg.train.autocast == "bf16":
            if self.device.type == "cpu" and not _native_bf16():
                # measured on an AVX2-only EPYC: the strided Conv4's step 10x slower than float32's
                _warn_once(
                    f"train.autocast=bf16 on a CPU without native bfloat16 (AVX-512 BF16 or AMX; this one: "
                    f"{torch.backends.cpu.get_cpu_capability()}): emulated, many times slower than float32"
                )
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def evaluate(self, flat_params: np.ndarray, tasks: TaskBatch, steps: list[int]) -> ScoreTrajectory:
        """Per-task query scores after 0..max(``steps``) inner steps, scored after 0 and each of ``steps``.
        Tasks go through the model a few at a time (``EVAL_EXAMPLES_PER_PASS``): they are independent,
        so the scores are the same, and memory stays bounded however many tasks a chunk holds."""
        params = self._params(flat_params)
        examples = tasks.support_x.shape[1] + tasks.query_x.shape[1]
        per_pass = max(1, EVAL_EXAMPLES_PER_PASS // examples)
        passes = []
        for start in range(0, len(tasks), per_pass):
            trajectory = self.algorithm.batch_trajectory(
                params,
                tasks.slice(start, start + per_pass).to_torch(self.device, self.dtype),
                max(steps),
                self.cfg.eval.inner_batch_size,
                score_at={0, *steps},
                # without BatchNorm there are no batch statistics: one query batch is the same
                transductive=self.cfg.eval.transductive or not type(self.algorithm.model).batch_norm,
            )
            passes.append({name: values.cpu().numpy() for name, values in trajectory.items()})
        scores = {name: np.concatenate([p[name] for p in passes]) for name in passes[0]}
        return ScoreTrajectory(scores["loss"], scores.get("accuracy"))
