"""Typed configuration, the schema only: dataclasses, YAML files, ``key=value`` overrides.

A run is fully described by one ``Config``. The loader checks what the schema says: an unknown key
(with a did-you-mean), a value of the wrong type, a choice outside its ``Literal``, a number outside
the bounds in its field's metadata (``bounded``), and the rules between fields of the config itself.
What a component needs (an algorithm's options, a model's, a task source's) is checked by that
component, all of them together by ``distmeta.assemble.check_run`` before anything starts. This
module imports no component.
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
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what is wrong and how to fix it."""


AUTO = "auto"  # a layout field resolved against the cluster the run lands on


def bounded(
    default: Any = dataclasses.MISSING,
    *,
    at_least: float | None = None,
    above: float | None = None,
    distinct: bool = False,
    **kw,
):
    """A field whose value (or each entry of its list) the loader keeps ``>= at_least`` or ``> above``;
    ``distinct``: a list holds no value twice."""
    return field(default=default, metadata={"at_least": at_least, "above": above, "distinct": distinct}, **kw)


@dataclass
class ImageFormat:
    """How an image file became a model input: decoded, converted to ``channels`` (1: grayscale, 3:
    RGB), resized to ``height`` x ``width`` (Lanczos), with ``invert`` each pixel replaced by 255
    minus itself, then scaled to [0, 1]. Training records it from its data (task.image_format), so
    a checkpoint alone prepares new images as its training images were (``distmeta adapt``).
    channels 0: not recorded (data that is not images, or a checkpoint from before distmeta 0.2)."""

    channels: int = bounded(0, at_least=0)
    height: int = bounded(0, at_least=0)
    width: int = bounded(0, at_least=0)
    invert: bool = False


@dataclass
class TaskConfig:
    source: str = "sinusoid"  # sinusoid | synthetic | shards (see distmeta.tasks.SOURCES)
    ways: int = bounded(5, at_least=2)  # classes per episode (classification)
    shots: int = bounded(10, at_least=1)  # support examples per class (per task for regression)
    queries: int = bounded(10, at_least=1)  # query examples per class (per task for regression)
    # shards source only: a directory written by `distmeta data build`
    shards: str = ""
    # set by training: a SHA-256 over the manifest's classes, splits and shard SHA-256s. A resumed or
    # evaluated run may take task.shards=NEWPATH (the data moved) if the shards there match it
    shards_fingerprint: str = ""
    # set by training from the data (the shards' manifest, or the synthetic images' shape)
    image_format: ImageFormat = field(default_factory=ImageFormat)
    split_scheme: str = "maml"  # the manifest's splits <scheme>/train, /val, /test (omniglot: maml | vinyals | lake)
    rotations: bool = True  # training classes also rotated by 90, 180, 270 degrees, as new classes
    # shards only: train on the scheme's validation classes too, as the final models of Prototypical
    # Networks' code do (its trainval mode, after choosing the budget on validation). Nothing is left
    # to validate on, so it needs train.eval_every=0; test episodes are unchanged
    train_with_val: bool = False
    # training episodes' labels: "episode", 0..ways-1 in each episode (meta-learning); "class", the
    # training split's class index (supervised pre-training over every class: algorithm baseline).
    # Validation and test episodes are labelled 0..ways-1 either way
    labels: Literal["episode", "class"] = "episode"
    # shards up to this size are memory-mapped (fastest); larger ones are read with pread, so a task
    # generator's resident memory stays flat however large the dataset (see data/shards.py)
    map_shards_mb: int = bounded(256, at_least=0)
    # synthetic classification source only
    num_classes: int = bounded(200, at_least=2)
    image_size: int = bounded(28, at_least=1)
    channels: int = bounded(1, at_least=1)


@dataclass
class ModelConfig:
    name: str = "mlp"  # mlp | conv4 (see distmeta.models.MODELS)
    hidden: list[int] = bounded(default_factory=lambda: [40, 40], at_least=1)  # mlp: the hidden layers' widths
    filters: int = bounded(64, at_least=1)  # conv4
    downsample: Literal["max_pool", "stride"] = "max_pool"  # conv4
    # linear: scores W f + b. cosine: s g_c cos(f, v_c) for each class c, a norm g_c learned per class,
    # no bias (Chen et al., 2019's Baseline++ classifier as their code has it, for algorithm.name=baseline;
    # s = 2 for up to 200 classes, else 10)
    head: Literal["linear", "cosine"] = "linear"


@dataclass
class AlgorithmConfig:
    # maml | fomaml | reptile | anil | metasgd | protonet | matchingnet | baseline (see distmeta.algorithms.ALGORITHMS)
    name: str = "maml"
    inner_lr: float = bounded(0.01, above=0)
    inner_steps: int = bounded(1, at_least=1)
    inner_optimizer: Literal["sgd", "adam"] = "sgd"  # adam: with beta1 = 0, first-order algorithms only
    # examples per inner step, cycling through the support set (one shot of every class before the
    # next, as Reptile's mini-batches); 0: the whole support set every step
    inner_batch_size: int = bounded(0, at_least=0)
    # auto: the fastest of those the model has, measured per device; batched: linear layers only (mlp);
    # threads: CPU workers only, the tasks split over the worker's cores
    implementation: Literal["auto", "vmap", "loop", "batched", "threads"] = "auto"
    fce: bool = False  # matchingnet: full context embeddings (LSTMs over the support set)
    fce_steps: int = bounded(5, at_least=1)  # matchingnet with fce: the attention LSTM's processing steps
    # baseline, at test only (so `distmeta evaluate` may change them): what its steps train (a new head,
    # or all), and where the new head starts (the support set's class centroids: 0 steps is the
    # nearest-centroid classifier; or zero, as a freshly made head: Chen et al.'s fine-tuning)
    finetune: Literal["head", "all"] = "head"
    head_init: Literal["centroid", "zero"] = "centroid"


# the algorithm fields above that only shape test time (the trained parameters do not depend on
# them): `distmeta evaluate` and `distmeta adapt` may set them on a trained checkpoint
TEST_TIME_ALGORITHM_FIELDS = ("algorithm.finetune=", "algorithm.head_init=")


@dataclass
class MetaOptimizerConfig:
    name: Literal["adam", "sgd"] = "adam"  # Reptile's outer step is sgd on theta - phi
    lr: float = bounded(1e-3, above=0)
    # anneal linearly towards this: step i of train.steps = n gets lr + (final_lr - lr) * i / n (Nichol
    # et al.'s code); None keeps lr
    final_lr: float | None = None
    decay_every: int = 0  # or: multiply lr by decay_factor every this many steps (ProtoNets: 0.5 every 2000)
    decay_factor: float = 0.5


@dataclass
class ClusterConfig:
    address: str | None = None  # None: embedded local Ray; "auto", "HOST:PORT" or "ray://HOST:PORT"
    # compiled: a Ray compiled graph; tasks: plain actor calls (runtime/engine.py)
    engine: Literal["auto", "compiled", "tasks"] = "auto"
    # The workers' layout; "auto" (the default) fills the cluster as benchmarks/peers.py measured
    # fastest: one worker per GPU, or without GPUs one single-threaded worker per CPU core
    # (runtime/cluster.py, plan_layout). The run's first line says what it chose.
    num_workers: int | str = AUTO
    gpus_per_worker: float | str = AUTO
    cpus_per_worker: float | str = AUTO
    num_task_generators: int = bounded(1, at_least=1)
    prefetch_batches: int = bounded(8, at_least=1)  # task batches generated ahead of the workers
    # steps (calls, with steps_per_call) submitted ahead of the one whose metrics the driver reads
    max_inflight_steps: int = bounded(4, at_least=1)
    # Fault tolerance (runtime/supervisor.py). A failed or timed-out step is re-run; the actors that
    # caused it are restarted by Ray up to actor_restarts times (-1: always; 0: a lost actor stops the run).
    # Meta-RL replaces all its actors at once after a fault: there it counts the run's replacements
    # since it (re)started
    actor_restarts: int = bounded(-1, at_least=-1)
    rejoin_timeout_s: float = bounded(60.0, above=0)  # after a fault, how long to wait for a worker before re-splitting
    # the longest a step may take; also how long a checkpoint waits for an earlier validation
    step_timeout_s: float = bounded(600.0, above=0)
    # a step slower than this many times the recent mean step time is a straggler's: the late workers
    # are restarted and the step re-run without them (0: only step_timeout_s)
    straggler_factor: float = 10.0
    # Placement (runtime/supervisor.py): one placement-group bundle {CPU, GPU} per worker, packed onto
    # as few nodes as possible or spread over as many (strict_*: or fail to place)
    placement: Literal["pack", "spread", "strict_pack", "strict_spread"] = "pack"
    placement_timeout_s: float = bounded(600.0, above=0)  # how long the cluster (and autoscaler) may take to fit them
    # a custom resource (e.g. "head", which cluster/local.sh and the cluster configs give the head
    # node) that the parameter server and task generators need a sliver of; empty: any node
    server_resource: str = ""
    # the flat parameter vector split across this many parameter-server actors, each summing and
    # stepping its slice: for large models, where one server's sum and optimizer step would limit
    # the step rate (benchmarks/ps_capacity.py); results are the same as with one server
    server_shards: int = bounded(1, at_least=1)
    # server: a parameter server (sharded or not) sums the updates and owns the meta-optimizer;
    # allreduce: no server, the workers sum their updates with torch.distributed and each steps
    # its own copy of the parameters (runtime/allreduce.py)
    reduce: Literal["server", "allreduce"] = "server"
    # all-reduce mode: each worker call runs up to this many consecutive steps, each on the
    # parameters after the one before (the same math as one step a call), so that a short step's
    # coordination is paid once a call; a call ends at a logging step at the latest
    steps_per_call: int = bounded(1, at_least=1)
    # a worker given a GPU that torch cannot see runs on the CPU (with a warning) instead of stopping
    # the run: for trying a cluster config with fake GPU resources, never for real training
    cpu_fallback: bool = False
    # Embedded Ray only: run the driver at the actors' CPU priority (Ray starts them at nice 15).
    # The driver busy-waits for compiled-graph results; at nice 0 it would preempt the workers it
    # waits for whenever cores are scarce (-17% step time on 2 cores).
    renice_driver: bool = True


@dataclass
class TrainConfig:
    steps: int = bounded(20000, at_least=1)
    meta_batch_size: int = bounded(25, at_least=1)
    seed: int = 0
    dtype: Literal["float32", "float64"] = "float32"
    # bf16: the workers' training forward and backward under torch.autocast to bfloat16 (faster on
    # CPUs with AVX-512 BF16 or AMX and on GPUs; not the same math: benchmarks/peers.py --bf16,
    # docs/benchmarks.md "Reduced precision"). Parameters, updates and evaluation stay in train.dtype.
    autocast: Literal["none", "bf16"] = "none"
    # GPU workers only. tf32: float32 convolutions and matrix products in TensorFloat-32 (a 10-bit
    # mantissa; cuDNN's default for convolutions); off, float32 is float32, as on the CPU and in
    # the float64 checks. deterministic: cuDNN's, cuBLAS's and torch's deterministic kernels, so a
    # stopped and resumed run repeats the uninterrupted one bit for bit as on the CPU; off, the
    # fastest kernels, some of which sum in a different order each run (atomics).
    tf32: bool = False
    deterministic: bool = True
    # TensorBoard scalars, averaged over this many steps (a window also ends at each checkpoint)
    log_every: int = bounded(20, at_least=1)
    print_every_s: float = bounded(5.0, above=0)
    checkpoint_every: int = bounded(1000, at_least=0)  # steps between checkpoints (0: only the final one)
    checkpoint_keep: int = bounded(3, at_least=0)  # periodic checkpoints kept, newest first (0: all)
    # empty: <logdir>/<run>/checkpoints; else the run's checkpoints go to <checkpoint_dir>/<run>, a
    # local folder or a pyarrow.fs URI (s3://bucket/prefix, gs://..., file:///...) every node sees
    checkpoint_dir: str = ""
    # a checkpoint (any: best.pt, final.pt, step_*.pt) whose parameters a fresh run starts from, at
    # step 0 with a fresh meta-optimizer (fine-tuning; a run cannot be resumed from best.pt)
    init_from: str = ""
    # consecutive steps rejected for non-finite updates before the run stops
    max_rejected_steps: int = bounded(10, at_least=1)
    # sync: every step waits for all workers (exact, reproducible). async: each worker updates the
    # parameters on its own, a whole meta-batch at a time, without waiting for the others; the
    # server applies an update computed on parameters at most max_staleness versions old, and
    # an older one as stale_updates says: drop it, or scale its step by (S + 1) / (staleness + 1)
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = bounded(4, at_least=0)
    stale_updates: Literal["drop", "scale"] = "drop"
    eval_every: int = bounded(2000, at_least=0)  # 0: no evaluation during training
    eval_tasks: int = bounded(100, at_least=1)


@dataclass
class EvalConfig:
    num_tasks: int = bounded(600, at_least=2)
    # classes per test episode; 0: task.ways (other values: metric-based learners only)
    ways: int = bounded(0, at_least=0)
    # support examples (per class); empty: task.shots. Distinct: each value's episodes are the same
    # stream, so a repeat would score them twice (and narrow the 95% CI by sqrt(2))
    shots: list[int] = bounded(default_factory=list, at_least=1, distinct=True)
    # inner steps to score after; empty: [1, 5, 10], or [0] for learners without an inner loop
    inner_steps: list[int] = bounded(default_factory=list, at_least=0, distinct=True)
    inner_batch_size: int = bounded(0, at_least=0)  # as algorithm.inner_batch_size, at test
    queries: int = bounded(100, at_least=1)
    seed: int = 1234  # held-out tasks come from their own stream, not the training one
    # True: batch statistics over the whole query set. False: each query example is passed through
    # the network with the support set alone (Nichol et al., 2018), so queries never inform each other
    transductive: bool = True
    divergence_factor: float = bounded(10.0, above=0)  # a task diverged if its loss ends above this times its start
    # meta-RL only: the step size of each test-time inner step, the last one repeated (the MAML
    # paper's 2-D navigation protocol: 0.1, then 0.05); empty: algorithm.inner_lr for every step
    step_sizes: list[float] = bounded(default_factory=list, above=0)


@dataclass
class RLConfig:
    """Meta-reinforcement learning (distmeta/rl/): algorithm.name maml_trpo or promp on the
    environment task.source names. The policy is an MLP of model.hidden; algorithm.inner_lr and
    inner_steps are the policy-gradient inner loop's, meta_optimizer.lr ProMP's Adam. At test,
    eval.shots are the episodes per inner step, eval.inner_steps the steps to score after."""

    episodes_per_task: int = bounded(20, at_least=1)  # per task, for each inner step and after the last
    gamma: float = bounded(0.99, above=0)  # the discount, at most 1
    gae_lambda: float = bounded(1.0, at_least=0)  # generalised advantage estimation's lambda, at most 1
    activation: Literal["tanh", "relu"] = "tanh"  # the policy's hidden layers
    # continuous actions: the policy's actions per unit of the environment's (ProMP's reference: 10)
    action_scale: float = bounded(1.0, above=0)
    first_order: bool = False  # the meta-gradient treats the inner step's gradient as a constant
    # maml_trpo: the trust-region meta-step (conjugate gradient, then a backtracking line search)
    max_kl: float = bounded(1e-2, above=0)
    cg_iters: int = bounded(10, at_least=1)
    cg_damping: float = bounded(1e-5, at_least=0)
    ls_max_steps: int = bounded(15, at_least=1)
    ls_backtrack_ratio: float = bounded(0.8, above=0)  # below 1
    # promp: Adam steps (meta_optimizer.lr) on PPO's clipped meta-objective, each batch of episodes
    ppo_steps: int = bounded(5, at_least=1)
    clip_eps: float = bounded(0.3, above=0)
    inner_kl_penalty: float = bounded(5e-4, at_least=0)


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    meta_optimizer: MetaOptimizerConfig = field(default_factory=MetaOptimizerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    logdir: str = "runs"
    run_name: str = ""  # empty: <algorithm>-<source>-<timestamp>-<6 random hex digits>

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        """The rules between the config's own fields (types, choices and bounds were checked as it
        was built). Those that involve a component are the components' (``distmeta.assemble``)."""
        _check_finite(self, "")  # first: nan fails every bound with a less helpful message
        _check_bounds(self, "")
        _check_layout(self.cluster)
        for name, seed in [("train.seed", self.train.seed), ("eval.seed", self.eval.seed)]:
            if not 0 <= seed < 2**63:  # the random streams take seeds as unsigned 64-bit, torch as signed
                raise ConfigError(f"{name} must be in 0 .. 2**63 - 1, got {seed}")
        if self.train.autocast != "none" and self.train.dtype != "float32":
            raise ConfigError(
                f"train.autocast={self.train.autocast} computes in reduced precision: use train.dtype=float32"
            )
        if self.meta_optimizer.final_lr is not None and self.meta_optimizer.final_lr < 0:
            raise ConfigError(f"meta_optimizer.final_lr must be >= 0, got {self.meta_optimizer.final_lr}")
        if not 0 < self.meta_optimizer.decay_factor <= 1 or self.meta_optimizer.decay_every < 0:
            raise ConfigError("meta_optimizer.decay_every must be >= 0 and meta_optimizer.decay_factor in (0, 1]")
        if self.meta_optimizer.decay_every and self.meta_optimizer.final_lr is not None:
            raise ConfigError("set meta_optimizer.final_lr (linear annealing) or decay_every (steps), not both")
        if self.cluster.straggler_factor != 0 and self.cluster.straggler_factor < 2:
            raise ConfigError(
                f"cluster.straggler_factor must be 0 (off) or >= 2 (times the mean step time), "
                f"got {self.cluster.straggler_factor}"
            )
        self._check_modes()
        for name, value, fine, bound in [
            ("rl.gamma", self.rl.gamma, self.rl.gamma <= 1, "<= 1"),
            ("rl.gae_lambda", self.rl.gae_lambda, self.rl.gae_lambda <= 1, "<= 1"),
            ("rl.ls_backtrack_ratio", self.rl.ls_backtrack_ratio, self.rl.ls_backtrack_ratio < 1, "< 1"),
        ]:
            if not fine:
                raise ConfigError(f"{name} must be {bound}, got {value}")
        if self.eval.ways == 1:
            raise ConfigError("eval.ways must be 0 (the training ways) or >= 2, got 1")
        if self.cluster.address is not None and not _valid_address(self.cluster.address):
            raise ConfigError(
                f"cluster.address={self.cluster.address!r} is not 'auto', 'HOST:PORT' or 'ray://HOST:PORT'"
            )
        return self

    def _check_modes(self) -> None:
        """The layout against the training mode and the reduction."""
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
        if self.cluster.steps_per_call > 1 and self.cluster.reduce != "allreduce":
            raise ConfigError(
                f"cluster.steps_per_call={self.cluster.steps_per_call} runs several steps in one worker call, "
                "which needs the workers to own the meta-optimizer: set cluster.reduce=allreduce, or "
                "cluster.steps_per_call=1"
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


def registered(key: str, name: str, registry: dict, what: str = ""):
    """``registry[name]``, or a ``ConfigError`` naming the choices (and the closest one); ``what``
    says for what, where the key alone does not ("as an environment")."""
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, registry, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    kind = f" {what}" if what else ""
    raise ConfigError(f"{key}={name!r} is not valid{kind}{hint}; choose one of: {', '.join(registry)}")


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    settings: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Defaults (or ``base``, e.g. a checkpoint's config), then a YAML file (after the files its
    ``base:`` key names), then ``settings`` ({"section.key": value}, e.g. from command-line flags),
    then ``section.key=value`` overrides (values in YAML syntax); validated."""
    data: dict[str, Any] = copy.deepcopy(base) if base else {}
    if path is not None:
        _merge(data, _read_yaml(Path(path), ()))
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


def _read_yaml(path: Path, including: tuple[Path, ...]) -> dict[str, Any]:
    """A config file's sections, on top of those of the files its ``base:`` key names (a path, or a
    list of them, relative to the file; later ones win), so that a family of configs states only
    what differs from a shared base."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (see configs/ for examples)")
    if path.resolve() in including:
        raise ConfigError(f"config file {path} is its own base (through {' -> '.join(map(str, including))})")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(loaded).__name__}")
    bases = loaded.pop("base", [])
    if not isinstance(bases, list | str) or not all(isinstance(b, str) for b in bases if isinstance(bases, list)):
        raise ConfigError(f"config file {path}: base must be a file name or a list of them, got {bases!r}")
    data: dict[str, Any] = {}
    for name in [bases] if isinstance(bases, str) else bases:
        _merge(data, _read_yaml(path.parent / name, (*including, path.resolve())))
    _merge(data, loaded)
    return data


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
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}={value!r} is not valid; choose one of: {', '.join(args)}")
        return value
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


def _check_bounds(section: Any, where: str) -> None:
    """Every ``bounded`` field (each entry of a list) within its bounds."""
    for entry in dataclasses.fields(section):
        value, name = getattr(section, entry.name), f"{where}{entry.name}"
        if dataclasses.is_dataclass(value):
            _check_bounds(value, f"{name}.")
        low, above = entry.metadata.get("at_least"), entry.metadata.get("above")
        for number in value if isinstance(value, list) else [value]:
            if low is not None and number < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
            if above is not None and not number > above:
                raise ConfigError(f"{name} must be > {above}, got {value}")
        if entry.metadata.get("distinct") and len(set(value)) < len(value):
            raise ConfigError(f"{name} lists a value more than once ({value}): give each once")


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


def _valid_address(address: str) -> bool:
    if address == "auto":
        return True
    host_port = address.removeprefix("ray://")
    host, sep, port = host_port.rpartition(":")
    return bool(sep and host and port.isdigit())
