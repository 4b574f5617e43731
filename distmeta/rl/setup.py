"""A meta-RL run's components from its ``Config``, checked before anything starts.

A run is meta-RL when ``algorithm.name`` is one of ``META_RL_ALGORITHMS``; ``task.source`` then
names an environment (``ENVIRONMENTS``). Add an algorithm in its own file (a learner with a
``config_class`` whose fields are named as the config's, see ``learner_config``) and one line
here. ``MetaRLSetup`` is what the driver, the server and every worker build their learner from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from distmeta.config import AUTO, Config, ConfigError, registered
from distmeta.params import DTYPES, ParamLayout, flat_parameters
from distmeta.rl.envs import ENVIRONMENTS, Environment
from distmeta.rl.maml_trpo import AdaptationConfig, MamlTrpo, MamlTrpoConfig
from distmeta.rl.policies import build_policy
from distmeta.rl.promp import ProMP, ProMPConfig

META_RL_ALGORITHMS: dict[str, type[MamlTrpo]] = {"maml_trpo": MamlTrpo, "promp": ProMP}
DEFAULT_EVAL_STEPS = [0, 1, 2, 3]  # the MAML paper's table for 2-D navigation


def is_meta_rl(cfg: Config) -> bool:
    return cfg.algorithm.name in META_RL_ALGORITHMS


@dataclass(frozen=True)
class MetaRLSetup:
    """What a run's learner is built from, by the driver, the server and every worker alike."""

    env: str | type[Environment]
    cfg: MamlTrpoConfig | ProMPConfig
    meta_batch_size: int
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "tanh"
    seed: int = 0
    dtype: torch.dtype = torch.float32
    action_scale: float = 1.0

    @classmethod
    def of(cls, cfg: Config) -> MetaRLSetup:
        t = cfg.train
        hidden = tuple(cfg.model.hidden)
        return cls(
            cfg.task.source,
            learner_config(cfg),
            t.meta_batch_size,
            hidden,
            cfg.rl.activation,
            t.seed,
            DTYPES[t.dtype],
            cfg.rl.action_scale,
        )

    @property
    def environment(self) -> type[Environment]:
        return ENVIRONMENTS[self.env] if isinstance(self.env, str) else self.env

    def build(self) -> tuple[MamlTrpo, ParamLayout, Tensor]:
        """The learner (its policy initialised under ``seed``), the parameters' layout, theta."""
        env = self.environment
        torch.manual_seed(self.seed)
        policy = build_policy(env, self.hidden, self.activation, self.action_scale).to(self.dtype)
        named = {n: p.detach() for n, p in policy.named_parameters()}
        kind = next(a for a in META_RL_ALGORITHMS.values() if type(self.cfg) is a.config_class)
        learner = kind(self.cfg, policy, env)
        return learner, ParamLayout.of(named), flat_parameters(named, self.dtype)


def learner_config(cfg: Config) -> AdaptationConfig:
    """The algorithm's own config: each of its fields from the config field of the same name
    (``rl.*``; ``inner_lr`` and ``inner_steps`` from ``algorithm``, ``learning_rate`` from
    ``meta_optimizer.lr``)."""
    kind = META_RL_ALGORITHMS[cfg.algorithm.name].config_class
    a = cfg.algorithm
    values = dataclasses.asdict(cfg.rl) | {
        "inner_lr": a.inner_lr,
        "inner_steps": a.inner_steps,
        "learning_rate": cfg.meta_optimizer.lr,
    }
    return kind(**{f.name: values[f.name] for f in dataclasses.fields(kind)})


def eval_steps(cfg: Config) -> list[int]:
    """The inner-step counts a meta-RL evaluation scores after."""
    return cfg.eval.inner_steps or DEFAULT_EVAL_STEPS


def eval_episodes(cfg: Config) -> list[int]:
    """Episodes per task and inner step at test: ``eval.shots``, or training's ``rl.episodes_per_task``."""
    return cfg.eval.shots or [cfg.rl.episodes_per_task]


def eval_step_sizes(cfg: Config) -> list[float]:
    """The step size of each test-time inner step, 1 .. max(eval_steps)."""
    sizes = cfg.eval.step_sizes or [cfg.algorithm.inner_lr]
    return [sizes[min(k, len(sizes) - 1)] for k in range(max(eval_steps(cfg)))]


def check_meta_rl(cfg: Config) -> Config:
    """``cfg``, once its environment is known and installed and no setting of the supervised
    runtime that meta-RL does not have is asked for; raises a ``ConfigError`` naming the fix."""
    env = registered("task.source", cfg.task.source, ENVIRONMENTS, "as an environment (meta-RL)")
    try:
        env.check_available()
    except ImportError as err:
        raise ConfigError(f"task.source={cfg.task.source}: {err}") from None
    c, t, a, m = cfg.cluster, cfg.train, cfg.algorithm, cfg.meta_optimizer
    unsupported = [
        (
            cfg.model.name != "mlp",
            f"model.name={cfg.model.name}",
            "model.name=mlp (the policy; model.hidden: its widths)",
        ),
        (cfg.model.head != "linear", f"model.head={cfg.model.head}", "linear (a policy's mean action)"),
        (
            c.gpus_per_worker not in (AUTO, 0),
            f"cluster.gpus_per_worker={c.gpus_per_worker}",
            "0 (rollouts run on CPUs)",
        ),
        (t.mode != "sync", f"train.mode={t.mode}", "sync"),
        (c.reduce != "server", f"cluster.reduce={c.reduce}", "server"),
        (t.autocast != "none", f"train.autocast={t.autocast}", "none"),
        (a.inner_optimizer != "sgd", f"algorithm.inner_optimizer={a.inner_optimizer}", "sgd (policy gradient)"),
        (a.inner_batch_size != 0, f"algorithm.inner_batch_size={a.inner_batch_size}", "0 (every episode)"),
        (cfg.eval.ways != 0, f"eval.ways={cfg.eval.ways}", "0"),
        (cfg.task.train_with_val, "task.train_with_val=true", "false (environments have no classes)"),
        (
            env.discrete and cfg.rl.action_scale != 1,
            f"rl.action_scale={cfg.rl.action_scale}",
            "1 (discrete actions are indices)",
        ),
        (
            m.name != "adam" or m.final_lr is not None or m.decay_every,
            f"meta_optimizer.name={m.name}, final_lr={m.final_lr}, decay_every={m.decay_every}",
            "Adam at a constant meta_optimizer.lr (ProMP's outer step; MAML-TRPO's is TRPO's, rl.max_kl)",
        ),
        (c.server_shards != 1, f"cluster.server_shards={c.server_shards}", "1"),
        (
            # the held-out streams are keyed like the training ones: one seed for both would repeat draws
            cfg.eval.seed == t.seed,
            f"eval.seed={cfg.eval.seed} (train.seed's)",
            "another eval.seed, so held-out tasks share no random draws with training's",
        ),
        (
            # a seed past 32 bits becomes two words of a stream's key, which can then equal a key of the
            # other seed's (train.seed=1234+2**32 drew test task 0 of eval.seed=1234 at step 0)
            max(t.seed, cfg.eval.seed) >= 2**32,
            f"train.seed={t.seed}, eval.seed={cfg.eval.seed}",
            "seeds below 2**32, so held-out tasks are never training tasks",
        ),
    ]
    wrong = [(setting, fix) for bad, setting, fix in unsupported if bad]
    if wrong:
        raise ConfigError(
            f"meta-RL ({a.name} on {cfg.task.source}) cannot run with "
            + "; ".join(f"{setting}: use {fix}" for setting, fix in wrong)
        )
    return cfg
