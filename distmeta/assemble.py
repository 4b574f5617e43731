"""A run checked as a whole before anything starts: the config against every component it names.

``load_config`` checks the schema (types, choices, bounds, rules between the config's own fields).
``check_run`` then finds each named component in its registry (``SOURCES``, ``MODELS``,
``ALGORITHMS``, with a did-you-mean) and asks it whether it can run this config: the task source
its options, the model the source's kind of task, the algorithm its own rules. Every entry point
(training, resuming, evaluation) calls it before Ray starts, so a bad combination fails in seconds
with the fix named, not on a worker minutes later.
"""

from __future__ import annotations

import dataclasses

from distmeta.algorithms import ALGORITHMS
from distmeta.config import AUTO, AlgorithmConfig, Config, ConfigError, registered
from distmeta.models import MODELS
from distmeta.rl.envs import ENVIRONMENTS
from distmeta.rl.setup import META_RL_ALGORITHMS, check_meta_rl, is_meta_rl
from distmeta.tasks import SOURCES


def check_run(cfg: Config) -> Config:
    """``cfg``, once every component it names accepts it; raises a ``ConfigError`` naming the fix.
    A meta-RL run (``algorithm.name`` maml_trpo or promp) is checked by ``rl.setup.check_meta_rl``."""
    if is_meta_rl(cfg):
        return check_meta_rl(cfg)
    if cfg.task.source in ENVIRONMENTS:  # a meta-RL algorithm's name, misspelled
        registered("algorithm.name", cfg.algorithm.name, META_RL_ALGORITHMS, f"on the environment {cfg.task.source}")
    source = registered("task.source", cfg.task.source, SOURCES)
    model = registered("model.name", cfg.model.name, MODELS)
    algorithm = registered("algorithm.name", cfg.algorithm.name, ALGORITHMS | META_RL_ALGORITHMS)
    if cfg.eval.step_sizes:
        raise ConfigError(
            "eval.step_sizes sets meta-RL's test-time step sizes; supervised evaluation uses algorithm.inner_lr"
        )
    source.check_options(cfg.task)
    if cfg.task.train_with_val and cfg.train.eval_every:
        raise ConfigError(
            "task.train_with_val=true trains on the validation classes, so validating on them would score "
            "training classes: set train.eval_every=0 (the final model is the result, chosen by its budget)"
        )
    kind = source.kind
    if model.task_kind != kind:
        fitting = " or ".join(name for name, m in MODELS.items() if m.task_kind == kind)
        raise ConfigError(f"task.source={cfg.task.source} is {kind}; use model.name={fitting}, not {cfg.model.name}")
    if cfg.algorithm.implementation == "batched" and not model.linear_layers:
        raise ConfigError(
            f"algorithm.implementation=batched runs linear layers as batched matrix products; "
            f"{cfg.model.name}'s convolutions have none (vmap runs them): use auto, vmap or loop"
        )
    if cfg.algorithm.implementation == "threads" and cfg.cluster.gpus_per_worker not in (0, AUTO):
        raise ConfigError(
            "algorithm.implementation=threads splits a worker's tasks over CPU cores; with "
            f"cluster.gpus_per_worker={cfg.cluster.gpus_per_worker:g} use auto, vmap or loop"
        )
    if cfg.eval.ways and kind == "regression":
        raise ConfigError(f"eval.ways applies to classification; task.source={cfg.task.source} is regression")
    algorithm.check(cfg, kind)
    if cfg.eval.ways not in (0, cfg.task.ways) and algorithm.uses_head and not algorithm.supervised:
        any_ways = [n for n, a in ALGORITHMS.items() if not a.uses_head or a.supervised]
        raise ConfigError(
            f"eval.ways={cfg.eval.ways} differs from task.ways={cfg.task.ways}, but "
            f"{cfg.algorithm.name}'s model ends in a {cfg.task.ways}-way head; only learners that test without "
            f"that head ({', '.join(any_ways)}) test with other ways"
        )
    return cfg


# meta-RL's inner loop: policy-gradient steps (check_meta_rl refuses other optimizers and batches)
META_RL_READS = ("inner_lr", "inner_steps", "inner_optimizer", "inner_batch_size")


def check_new_run(cfg: Config) -> None:
    """What a new run's own config must also satisfy, beyond ``check_run``: no ``algorithm.*``
    setting its learner does not read, set away from its default (it would change nothing while the
    user believes the method changed). Not asked of a trained checkpoint's config (evaluate,
    resume): runs from before the rule may hold such a setting, harmlessly."""
    a = cfg.algorithm
    reads = META_RL_READS if is_meta_rl(cfg) else ALGORITHMS[a.name].reads
    default = AlgorithmConfig()
    unread = [
        f"algorithm.{f.name}={getattr(a, f.name)}"
        for f in dataclasses.fields(a)
        if f.name not in ("name", "implementation", *reads) and getattr(a, f.name) != getattr(default, f.name)
    ]
    if unread:
        named = ", ".join(f"algorithm.{name}" for name in reads) or "none of them"
        raise ConfigError(
            f"{', '.join(unread)}: {a.name} does not read it, so it would change nothing (it reads {named}); "
            "leave it at its default"
        )
