"""Typed configuration: dataclasses, YAML files, ``key=value`` overrides, validation.

A run is fully described by one ``Config``. Every field is checked before anything starts, and
an unknown key or a bad value is rejected with the valid choices named.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what is wrong and how to fix it."""


AUTO = "auto"  # a layout field resolved against the cluster the run lands on


@dataclass
class TaskConfig:
    source: str = "sinusoid"  # sinusoid | synthetic | shards (see distmeta.tasks.SOURCES)
    ways: int = 5  # classes per episode (classification)
    shots: int = 10  # support examples per class (per task for regression)
    queries: int = 10  # query examples per class (per task for regression)
    # shards source only: a directory written by `distmeta data build`
    shards: str = ""
    # set by training: a SHA-256 over the manifest's classes, splits and shard SHA-256s. A resumed or
    # evaluated run may take task.shards=NEWPATH (the data moved) if the shards there match it
    shards_fingerprint: str = ""
    split_scheme: str = "maml"  # the manifest's splits <scheme>/train, /val, /test (omniglot: maml | vinyals | lake)
    rotations: bool = True  # training classes also rotated by 90, 180, 270 degrees, as new classes
    # shards up to this size are memory-mapped (fastest); larger ones are read with pread, so a task
    # generator's resident memory stays flat however large the dataset (see data/shards.py)
    map_shards_mb: int = 256
    # synthetic classification source only
    num_classes: int = 200
    image_size: int = 28
    channels: int = 1


@dataclass
class ModelConfig:
    name: str = "mlp"  # mlp | conv4
    hidden: list[int] = field(default_factory=lambda: [40, 40])  # mlp
    filters: int = 64  # conv4
    downsample: str = "max_pool"  # conv4: max_pool | stride


@dataclass
class AlgorithmConfig:
    # maml | fomaml | reptile | anil | metasgd | protonet | matchingnet (see distmeta.algorithms.ALGORITHMS)
    name: str = "maml"
    inner_lr: float = 0.01
    inner_steps: int = 1
    inner_optimizer: str = "sgd"  # sgd | adam (Adam with beta1 = 0, first-order algorithms only)
    # examples per inner step, cycling through the support set (one shot of every class before the
    # next, as Reptile's mini-batches); 0: the whole support set every step
    inner_batch_size: int = 0
    implementation: str = "auto"  # auto (measured per device) | vmap | loop | batched (mlp only)
    fce: bool = False  # matchingnet: full context embeddings (LSTMs over the support set)
    fce_steps: int = 5  # matchingnet with fce: the attention LSTM's processing steps


@dataclass
class MetaOptimizerConfig:
    name: str = "adam"  # adam | sgd (Reptile's outer step is sgd on theta - phi)
    lr: float = 1e-3
    final_lr: float | None = None  # anneal linearly to this by the last step; None keeps lr
    decay_every: int = 0  # or: multiply lr by decay_factor every this many steps (ProtoNets: 0.5 every 2000)
    decay_factor: float = 0.5


@dataclass
class ClusterConfig:
    address: str | None = None  # None: embedded local Ray; "auto", "HOST:PORT" or "ray://HOST:PORT"
    engine: str = "auto"  # auto | compiled (Ray compiled graph) | tasks (plain actor calls); runtime/engine.py
    # The workers' layout; "auto" (the default) fills the cluster as benchmarks/peers.py measured
    # fastest: one worker per GPU, or without GPUs one single-threaded worker per CPU core
    # (runtime/cluster.py, plan_layout). The run's first line says what it chose.
    num_workers: int | str = AUTO
    gpus_per_worker: float | str = AUTO
    cpus_per_worker: float | str = AUTO
    num_task_generators: int = 1
    prefetch_batches: int = 8  # task batches generated ahead of the workers
    max_inflight_steps: int = 4  # steps submitted ahead of the step whose metrics the driver reads
    # Fault tolerance (runtime/supervisor.py). A failed or timed-out step is re-run; the actors that
    # caused it are restarted by Ray up to actor_restarts times (-1: always; 0: a lost actor stops the run)
    actor_restarts: int = -1
    rejoin_timeout_s: float = 60.0  # after a fault, how long to wait for a worker before re-splitting without it
    step_timeout_s: float = 600.0  # the longest any step may take
    # a step slower than this many times the recent mean step time is a straggler's: the late workers
    # are restarted and the step re-run without them (0: only step_timeout_s)
    straggler_factor: float = 10.0
    # Placement (runtime/supervisor.py): one placement-group bundle {CPU, GPU} per worker, packed onto
    # as few nodes as possible or spread over as many (strict_*: or fail to place)
    placement: str = "pack"  # pack | spread | strict_pack | strict_spread
    placement_timeout_s: float = 600.0  # how long the cluster (and its autoscaler) may take to fit them
    # a custom resource (e.g. "head", which cluster/local.sh and the cluster configs give the head
    # node) that the parameter server and task generators need a sliver of; empty: any node
    server_resource: str = ""
    # the flat parameter vector split across this many parameter-server actors, each summing and
    # stepping its slice: for large models, where one server's sum and optimizer step would limit
    # the step rate (benchmarks/ps_capacity.py); results are the same as with one server
    server_shards: int = 1
    # server: a parameter server (sharded or not) sums the updates and owns the meta-optimizer;
    # allreduce: no server, the workers sum their updates with torch.distributed and each steps
    # its own copy of the parameters (runtime/allreduce.py)
    reduce: str = "server"
    # a worker given a GPU that torch cannot see runs on the CPU (with a warning) instead of stopping
    # the run: for trying a cluster config with fake GPU resources, never for real training
    cpu_fallback: bool = False
    # Embedded Ray only: run the driver at the actors' CPU priority (Ray starts them at nice 15).
    # The driver busy-waits for compiled-graph results; at nice 0 it would preempt the workers it
    # waits for whenever cores are scarce (-17% step time on 2 cores).
    renice_driver: bool = True


@dataclass
class TrainConfig:
    steps: int = 20000
    meta_batch_size: int = 25
    seed: int = 0
    dtype: str = "float32"  # float32 | float64
    # bf16: the workers' training forward and backward under torch.autocast to bfloat16 (faster on
    # CPUs with AVX-512 BF16 or AMX and on GPUs; not the same math: benchmarks/peers.py --bf16,
    # README "Reduced precision"). Parameters, updates and evaluation stay in train.dtype.
    autocast: str = "none"  # none | bf16
    log_every: int = 20  # TensorBoard scalars, averaged over this many steps
    print_every_s: float = 5.0
    checkpoint_every: int = 1000  # steps between checkpoints (0: only the final one)
    checkpoint_keep: int = 3  # periodic checkpoints kept, newest first (0: all)
    # empty: <logdir>/<run>/checkpoints; else the run's checkpoints go to <checkpoint_dir>/<run>, a
    # local folder or a pyarrow.fs URI (s3://bucket/prefix, gs://..., file:///...) every node sees
    checkpoint_dir: str = ""
    # a checkpoint (any: best.pt, final.pt, step_*.pt) whose parameters a fresh run starts from, at
    # step 0 with a fresh meta-optimizer (fine-tuning; a run cannot be resumed from best.pt)
    init_from: str = ""
    max_rejected_steps: int = 10  # consecutive steps rejected for non-finite updates before the run stops
    # sync: every step waits for all workers (exact, reproducible). async: each worker updates the
    # parameters on its own, a whole meta-batch at a time, without waiting for the others; the
    # server applies an update computed on parameters at most max_staleness versions old, and
    # an older one as stale_updates says: drop it, or scale its step by (S + 1) / (staleness + 1)
    mode: str = "sync"
    max_staleness: int = 4
    stale_updates: str = "drop"
    eval_every: int = 2000  # 0: no evaluation during training
    eval_tasks: int = 100


@dataclass
class EvalConfig:
    num_tasks: int = 600
    ways: int = 0  # classes per test episode; 0: task.ways (other values: metric-based learners only)
    shots: list[int] = field(default_factory=list)  # support examples (per class); empty: task.shots
    # inner steps to score after; empty: [1, 5, 10], or [0] for learners without an inner loop
    inner_steps: list[int] = field(default_factory=list)
    inner_batch_size: int = 0  # as algorithm.inner_batch_size, at test
    queries: int = 100
    seed: int = 1234  # held-out tasks come from their own stream, not the training one
    # True: batch statistics over the whole query set. False: each query example is passed through
    # the network with the support set alone (Nichol et al., 2018), so queries never inform each other
    transductive: bool = True
    divergence_factor: float = 10.0  # a task diverged if its loss ends above this times its start


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    meta_optimizer: MetaOptimizerConfig = field(default_factory=MetaOptimizerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logdir: str = "runs"
    run_name: str = ""  # empty: <algorithm>-<source>-<timestamp>-<6 random hex digits>

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        from distmeta.algorithms import ALGORITHMS
        from distmeta.models import MODEL_NAMES
        from distmeta.tasks import SOURCES

        _choice("task.source", self.task.source, SOURCES)
        if self.task.source == "shards" and not self.task.shards:
            raise ConfigError("task.source=shards needs task.shards=DIR, a folder written by `distmeta data build`")
        _choice("cluster.engine", self.cluster.engine, ("auto", "compiled", "tasks"))
        _choice("cluster.placement", self.cluster.placement, ("pack", "spread", "strict_pack", "strict_spread"))
        _choice("cluster.reduce", self.cluster.reduce, ("server", "allreduce"))
        _choice("model.name", self.model.name, MODEL_NAMES)
        _choice("model.downsample", self.model.downsample, ("max_pool", "stride"))
        _choice("algorithm.name", self.algorithm.name, ALGORITHMS)
        _choice("algorithm.inner_optimizer", self.algorithm.inner_optimizer, ("sgd", "adam"))
        _choice("algorithm.implementation", self.algorithm.implementation, ("auto", "vmap", "loop", "batched"))
        if self.algorithm.implementation == "batched" and self.model.name != "mlp":
            raise ConfigError(
                f"algorithm.implementation=batched runs linear layers as batched matrix products; "
                f"{self.model.name}'s convolutions have none (vmap runs them): use auto, vmap or loop"
            )
        _choice("meta_optimizer.name", self.meta_optimizer.name, ("adam", "sgd"))
        _choice("train.dtype", self.train.dtype, ("float32", "float64"))
        _choice("train.autocast", self.train.autocast, ("none", "bf16"))
        if self.train.autocast != "none" and self.train.dtype != "float32":
            raise ConfigError(
                f"train.autocast={self.train.autocast} computes in reduced precision: use train.dtype=float32"
            )
        _choice("train.mode", self.train.mode, ("sync", "async"))
        _choice("train.stale_updates", self.train.stale_updates, ("drop", "scale"))
        for name, value, low in [
            ("task.ways", self.task.ways, 2),
            ("task.shots", self.task.shots, 1),
            ("task.queries", self.task.queries, 1),
            ("task.num_classes", self.task.num_classes, 2),
            ("task.image_size", self.task.image_size, 1),
            ("task.channels", self.task.channels, 1),
            ("task.map_shards_mb", self.task.map_shards_mb, 0),
            ("model.filters", self.model.filters, 1),
            ("algorithm.inner_steps", self.algorithm.inner_steps, 1),
            ("algorithm.inner_batch_size", self.algorithm.inner_batch_size, 0),
            ("algorithm.fce_steps", self.algorithm.fce_steps, 1),
            ("eval.ways", self.eval.ways, 0),
            ("eval.inner_batch_size", self.eval.inner_batch_size, 0),
            ("cluster.num_task_generators", self.cluster.num_task_generators, 1),
            ("cluster.server_shards", self.cluster.server_shards, 1),
            ("cluster.prefetch_batches", self.cluster.prefetch_batches, 1),
            ("cluster.max_inflight_steps", self.cluster.max_inflight_steps, 1),
            ("train.steps", self.train.steps, 1),
            ("train.meta_batch_size", self.train.meta_batch_size, 1),
            ("train.log_every", self.train.log_every, 1),
            ("train.checkpoint_every", self.train.checkpoint_every, 0),
            ("train.checkpoint_keep", self.train.checkpoint_keep, 0),
            ("train.max_rejected_steps", self.train.max_rejected_steps, 1),
            ("train.max_staleness", self.train.max_staleness, 0),
            ("cluster.actor_restarts", self.cluster.actor_restarts, -1),
            ("train.eval_every", self.train.eval_every, 0),
            ("train.eval_tasks", self.train.eval_tasks, 1),
            ("eval.num_tasks", self.eval.num_tasks, 2),
            ("eval.queries", self.eval.queries, 1),
        ]:
            if value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        _check_layout(self.cluster)
        _check_finite(self, "")
        for name, seed in [("train.seed", self.train.seed), ("eval.seed", self.eval.seed)]:
            if not 0 <= seed < 2**63:  # the random streams take seeds as unsigned 64-bit, torch as signed
                raise ConfigError(f"{name} must be in 0 .. 2**63 - 1, got {seed}")
        for name, value in [
            ("algorithm.inner_lr", self.algorithm.inner_lr),
            ("meta_optimizer.lr", self.meta_optimizer.lr),
            ("train.print_every_s", self.train.print_every_s),
            ("cluster.step_timeout_s", self.cluster.step_timeout_s),
            ("cluster.rejoin_timeout_s", self.cluster.rejoin_timeout_s),
            ("cluster.placement_timeout_s", self.cluster.placement_timeout_s),
            ("eval.divergence_factor", self.eval.divergence_factor),
        ]:
            if not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value}")
        if self.meta_optimizer.final_lr is not None and self.meta_optimizer.final_lr < 0:
            raise ConfigError(f"meta_optimizer.final_lr must be >= 0, got {self.meta_optimizer.final_lr}")
        if self.meta_optimizer.decay_every < 0 or not 0 < self.meta_optimizer.decay_factor <= 1:
            raise ConfigError("meta_optimizer.decay_every must be >= 0 and meta_optimizer.decay_factor in (0, 1]")
        if self.meta_optimizer.decay_every and self.meta_optimizer.final_lr is not None:
            raise ConfigError("set meta_optimizer.final_lr (linear annealing) or decay_every (steps), not both")
        if self.cluster.straggler_factor != 0 and self.cluster.straggler_factor < 2:
            raise ConfigError(
                f"cluster.straggler_factor must be 0 (off) or >= 2 (times the mean step time), "
                f"got {self.cluster.straggler_factor}"
            )
        workers = self.cluster.num_workers
        if self.train.mode == "sync" and workers != AUTO and workers > self.train.meta_batch_size:
            raise ConfigError(
                f"cluster.num_workers ({self.cluster.num_workers}) exceeds train.meta_batch_size "
                f"({self.train.meta_batch_size}): every worker needs at least one task per step"
            )
        if (
            self.train.mode == "async"
            and self.train.stale_updates == "drop"
            and workers != AUTO
            and (self.train.max_staleness < workers - 1)
        ):
            raise ConfigError(
                f"train.max_staleness={self.train.max_staleness} with {self.cluster.num_workers} asynchronous workers "
                f"would drop most updates: while one worker computes, the other {self.cluster.num_workers - 1} "
                f"each update the parameters once, so set train.max_staleness >= {self.cluster.num_workers - 1} "
                "(or train.stale_updates=scale)"
            )
        if self.train.mode == "async" and self.cluster.engine == "compiled":
            raise ConfigError(
                "train.mode=async runs on plain actor calls (a compiled graph moves in lock step); "
                "set cluster.engine=auto or tasks"
            )
        if self.cluster.reduce == "allreduce":
            wrong = [
                f"{name}={value}"
                for name, value, fine in [
                    ("train.mode", self.train.mode, self.train.mode == "sync"),
                    ("cluster.server_shards", self.cluster.server_shards, self.cluster.server_shards == 1),
                    ("cluster.engine", self.cluster.engine, self.cluster.engine in ("auto", "tasks")),
                ]
                if not fine
            ]
            if wrong:
                raise ConfigError(
                    f"cluster.reduce=allreduce has no parameter server and runs synchronous steps on plain actor "
                    f"calls: it cannot go with {', '.join(wrong)} (use train.mode=sync, cluster.server_shards=1, "
                    "cluster.engine=auto)"
                )
        if any(k < 1 for k in self.eval.shots) or any(k < 0 for k in self.eval.inner_steps):
            raise ConfigError("eval.shots must be >= 1 and eval.inner_steps counts >= 0")
        if self.model.hidden and min(self.model.hidden) < 1:
            raise ConfigError(f"model.hidden sizes must be >= 1, got {self.model.hidden}")
        algorithm = ALGORITHMS[self.algorithm.name]
        if self.algorithm.inner_optimizer == "adam" and algorithm.adaptive and not algorithm.first_order:
            raise ConfigError(
                f"algorithm.inner_optimizer=adam needs a first-order algorithm (fomaml, reptile), "
                f"not {self.algorithm.name}: differentiating through Adam's square root is unstable"
            )
        if self.algorithm.fce and self.algorithm.name != "matchingnet":
            raise ConfigError(f"algorithm.fce is a matchingnet option; {self.algorithm.name} has no such embeddings")
        source_kind = SOURCES[self.task.source].kind
        if self.eval.ways and source_kind == "regression":
            raise ConfigError(f"eval.ways applies to classification; task.source={self.task.source} is regression")
        if self.eval.ways == 1:
            raise ConfigError("eval.ways must be 0 (the training ways) or >= 2, got 1")
        if not algorithm.adaptive and source_kind != "classification":
            raise ConfigError(
                f"algorithm.name={self.algorithm.name} classifies; task.source={self.task.source} is {source_kind}"
            )
        if not algorithm.adaptive and any(self.eval.inner_steps):
            raise ConfigError(
                f"algorithm.name={self.algorithm.name} has no inner loop; set eval.inner_steps=[0] (or leave it empty)"
            )
        if self.eval.ways not in (0, self.task.ways) and algorithm.uses_head:
            raise ConfigError(
                f"eval.ways={self.eval.ways} differs from task.ways={self.task.ways}, but "
                f"{self.algorithm.name}'s model ends in a {self.task.ways}-way head; only metric-based learners "
                f"({', '.join(n for n, a in ALGORITHMS.items() if not a.uses_head)}) test with other ways"
            )
        expected_model = "mlp" if source_kind == "regression" else "conv4"
        if self.model.name != expected_model:
            raise ConfigError(
                f"task.source={self.task.source} is {source_kind}; use model.name={expected_model}, "
                f"not {self.model.name}"
            )
        if self.cluster.address is not None and not _valid_address(self.cluster.address):
            raise ConfigError(
                f"cluster.address={self.cluster.address!r} is not 'auto', 'HOST:PORT' or 'ray://HOST:PORT'"
            )
        return self


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    settings: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Defaults (or ``base``, e.g. a checkpoint's config), then a YAML file, then ``settings``
    ({"section.key": value}, e.g. from command-line flags), then ``section.key=value`` overrides
    (values in YAML syntax); validated."""
    data: dict[str, Any] = copy.deepcopy(base) if base else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (see configs/ for examples)")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(loaded).__name__}")
        _merge(data, loaded)
    for key, value in (settings or {}).items():
        _set(data, key, value, key)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(err).splitlines()[0]})") from None
        _set(data, key.strip(), value, item)
    return config_from_dict(data)


def _set(data: dict, dotted: str, value: Any, origin: str) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {origin!r}: {part} is not a section")
    node[leaf] = value


def _merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def config_from_dict(data: dict[str, Any]) -> Config:
    """A validated ``Config`` from its ``to_dict()`` form (as stored in checkpoints)."""
    return _build(Config, data, "").validate()


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {where}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint}; valid keys here: {', '.join(fields)}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, value, f"{path}.")
        else:
            kwargs[key] = _coerce(value, kind, path)
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, path: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        for inner in kinds[:-1]:  # int | str: a number if it is one, else the string
            with contextlib.suppress(ConfigError):
                return _coerce(value, inner, path)
        return _coerce(value, kinds[-1], path)
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if kind is str and value is None:
        raise ConfigError(f"{path} must be a string, got null")
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{path} must be {kind.__name__}, got {value!r}")


def _check_layout(cluster: ClusterConfig) -> None:
    """Each layout field is "auto" or a number in range."""
    for name, low, strict in (("num_workers", 1, False), ("cpus_per_worker", 0, True), ("gpus_per_worker", 0, False)):
        value = getattr(cluster, name)
        if value == AUTO:
            continue
        if isinstance(value, str) or (value <= low if strict else value < low):
            bound = f"> {low}" if strict else f">= {low}"
            raise ConfigError(f"cluster.{name} must be {AUTO} or a number {bound}, got {value!r}")
        if name == "num_workers" and not isinstance(value, int):
            raise ConfigError(f"cluster.num_workers must be {AUTO} or a whole number, got {value!r}")


def _check_finite(section: Any, where: str) -> None:
    """Every float field is a finite number: .inf or .nan pass a range check such as ``> 0`` (a
    learning rate of inf trains to NaN parameters; a timeout of inf never fires)."""
    for entry in dataclasses.fields(section):
        value, name = getattr(section, entry.name), f"{where}{entry.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{name}.")
        for number in value if isinstance(value, list) else [value]:
            if isinstance(number, float) and not math.isfinite(number):
                raise ConfigError(f"{name} must be a finite number, got {number}")


def _choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(choices)}")


def _valid_address(address: str) -> bool:
    if address == "auto":
        return True
    host_port = address.removeprefix("ray://")
    host, sep, port = host_port.rpartition(":")
    return bool(sep and host and port.isdigit())
