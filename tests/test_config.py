import subprocess
import sys

import pytest

from distmeta.assemble import check_run
from distmeta.config import Config, ConfigError, load_config


def checked(*overrides: str) -> Config:
    """A config as a run sees it: the schema's checks (load_config), then every component's (check_run)."""
    return check_run(load_config(None, list(overrides)))


def test_defaults_are_the_sinusoid_maml_job():
    cfg = load_config()
    assert (cfg.task.source, cfg.model.name, cfg.algorithm.name) == ("sinusoid", "mlp", "maml")
    assert cfg.model.hidden == [40, 40] and cfg.cluster.address is None


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "algorithm:\n  name: reptile\n  inner_steps: 5\n  inner_optimizer: adam\nmeta_optimizer:\n  name: sgd\n"
    )
    cfg = load_config(
        path, ["algorithm.inner_lr=2e-2", "meta_optimizer.final_lr=0", "eval.shots=[5]", "cluster.address=null"]
    )
    assert cfg.algorithm.name == "reptile" and cfg.algorithm.inner_steps == 5
    assert cfg.algorithm.inner_lr == 0.02 and isinstance(cfg.meta_optimizer.final_lr, float)
    assert cfg.eval.shots == [5] and cfg.cluster.address is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("algorithm.inner_lrr=0.1", "did you mean algorithm.inner_lr"),
        ("trian.steps=5", "valid keys here: task, model, algorithm"),
        ("algorithm.name=mamll", r"\(did you mean maml\?\); choose one of: maml, fomaml, reptile, anil, metasgd"),
        ("model.name=resnet", "model.name='resnet' is not valid; choose one of: mlp, conv4"),
        ("task.source=shards", "task.source=shards needs task.shards=DIR"),
        ("model.downsample=avg", "model.downsample='avg' is not valid; choose one of: max_pool, stride"),
        ("model.hidden=[40, 0]", r"model.hidden must be >= 1, got \[40, 0\]"),
        ("algorithm.implementation=fast", "choose one of: auto, vmap, loop, batched"),
        ("cluster.engine=threads", "choose one of: auto, compiled, tasks"),
        ("train.steps=0", "train.steps must be >= 1"),
        ("eval.shots=[1, 5, 1]", r"eval.shots lists a value more than once \(\[1, 5, 1\]\)"),
        ("eval.inner_steps=[3, 3]", "eval.inner_steps lists a value more than once"),
        ("train.steps=ten", "train.steps must be int"),
        ("train.steps=true", "train.steps must be int"),
        ("algorithm.inner_lr=-1", "algorithm.inner_lr must be > 0"),
        ("cluster.num_workers=30", "exceeds train.meta_batch_size"),
        ("algorithm.inner_optimizer=adam", "needs a first-order algorithm"),
        ("model.name=conv4", "use model.name=mlp"),
        ("cluster.address=localhost", "not 'auto', 'HOST:PORT'"),
        ("steps", "not of the form section.key=value"),
        ("train=5", "train must be a mapping"),
        ("algorithm.name=protonet", "algorithm.name=protonet classifies; task.source=sinusoid is regression"),
        ("algorithm.fce_steps=0", "algorithm.fce_steps must be >= 1"),
        ("eval.ways=5", "eval.ways applies to classification; task.source=sinusoid is regression"),
        ("cluster.reduce=ring", "choose one of: server, allreduce"),
        ("cluster.server_shards=0", "cluster.server_shards must be >= 1"),
        ("train.seed=-1", r"train.seed must be in 0 .. 2\*\*63 - 1, got -1"),
        ("eval.seed=9223372036854775808", r"eval.seed must be in 0 .. 2\*\*63 - 1"),
        ("meta_optimizer.lr=.inf", "meta_optimizer.lr must be a finite number, got inf"),
        ("cluster.step_timeout_s=.inf", "cluster.step_timeout_s must be a finite number, got inf"),
        ("eval.divergence_factor=.nan", "eval.divergence_factor must be a finite number, got nan"),
        ("meta_optimizer.final_lr=-.inf", "meta_optimizer.final_lr must be a finite number, got -inf"),
    ],
)
def test_bad_values_are_rejected_with_the_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        checked(override)


def test_the_batched_implementation_is_for_linear_layers_only():
    assert checked("algorithm.implementation=batched").algorithm.implementation == "batched"
    with pytest.raises(ConfigError, match="conv4's convolutions have none"):
        checked("task.source=synthetic", "model.name=conv4", "algorithm.implementation=batched")


def test_the_threads_implementation_is_for_cpu_workers_only():
    assert checked("algorithm.implementation=threads").algorithm.implementation == "threads"
    with pytest.raises(ConfigError, match="threads splits a worker's tasks over CPU cores; with cluster.gpus_per"):
        checked("algorithm.implementation=threads", "cluster.gpus_per_worker=1", "cluster.cpu_fallback=true")


def test_allreduce_mode_refuses_what_needs_a_server_or_a_compiled_graph():
    with pytest.raises(ConfigError, match=r"cannot go with cluster.server_shards=2, cluster.engine=compiled"):
        load_config(None, ["cluster.reduce=allreduce", "cluster.server_shards=2", "cluster.engine=compiled"])
    with pytest.raises(ConfigError, match=r"cannot go with train.mode=async \(use train.mode=sync"):
        load_config(None, ["cluster.reduce=allreduce", "train.mode=async"])
    assert load_config(None, ["cluster.reduce=allreduce"]).cluster.reduce == "allreduce"
    with pytest.raises(
        ConfigError, match="steps_per_call=4 runs several steps in one worker call.*cluster.reduce=allreduce"
    ):
        load_config(None, ["cluster.steps_per_call=4"])  # a server applies each step before the next is computed
    assert load_config(None, ["cluster.reduce=allreduce", "cluster.steps_per_call=4"]).cluster.steps_per_call == 4


IMAGES = ["task.source=synthetic", "model.name=conv4"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval.ways=3"], r"eval.ways=3 differs from task.ways=5, but maml's model ends in a 5-way head; .*protonet"),
        (["algorithm.name=anil", "eval.ways=20"], "anil's model ends in a 5-way head"),
        (["algorithm.name=protonet", "eval.inner_steps=[0, 1]"], r"no inner loop; set eval.inner_steps=\[0\]"),
    ],
)
def test_evaluation_settings_the_algorithm_cannot_use_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        checked(*IMAGES, *overrides)


def test_evaluation_defaults_follow_the_algorithm():
    from distmeta.evaluate import eval_steps

    assert eval_steps(load_config(None, IMAGES)) == [1, 5, 10]
    protonet = load_config(None, [*IMAGES, "algorithm.name=protonet", "task.ways=20", "eval.ways=5"])
    assert eval_steps(protonet) == [0] and protonet.eval.ways == 5  # trains 20-way, tests 5-way


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        assert isinstance(check_run(load_config(path)), Config)


def test_every_shipped_config_resolves_as_recorded():
    """The configs state only what differs from their bases (configs/base/): each resolves to the
    values it had when it spelled everything out (tests/shipped_configs.json, written then)."""
    import json
    from pathlib import Path

    root = Path(__file__).parent.parent / "configs"
    recorded = json.loads((Path(__file__).parent / "shipped_configs.json").read_text())
    assert sorted(recorded) == sorted(p.name for p in root.glob("*.yaml"))
    for name, values in recorded.items():
        assert load_config(root / name).to_dict() == values, name


def test_a_config_builds_on_its_bases_and_bad_bases_are_named(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  steps: 7\n  seed: 3\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain:\n  seed: 4\n")
    (tmp_path / "c.yaml").write_text("base: [b.yaml]\nalgorithm:\n  inner_lr: 0.5\n")
    cfg = load_config(tmp_path / "c.yaml", ["train.seed=5"])
    assert (cfg.train.steps, cfg.train.seed, cfg.algorithm.inner_lr) == (7, 5, 0.5)
    assert load_config(tmp_path / "b.yaml").train.seed == 4  # later files win over their bases
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="is its own base"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "lost.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml does not exist"):
        load_config(tmp_path / "lost.yaml")
    (tmp_path / "odd.yaml").write_text("base: {a: 1}\n")
    with pytest.raises(ConfigError, match="base must be a file name or a list of them"):
        load_config(tmp_path / "odd.yaml")


def test_round_trip_through_dict():
    from distmeta.config import config_from_dict

    cfg = load_config(None, ["algorithm.name=fomaml", "eval.inner_steps=[0, 3]"])
    assert config_from_dict(cfg.to_dict()) == cfg


def _imports(module: str) -> set[str]:
    """The modules a fresh interpreter has loaded after importing ``module``."""
    code = f"import sys, {module}; print(' '.join(sys.modules))"
    return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())


def test_the_layers_stay_apart():
    """The compute core (meta-RL's too: rl/local.py imports all of it) runs without Ray, and the
    config schema knows no component: a component checks its own options (distmeta.assemble asks
    them all), so a new one touches no central file."""
    components = ("distmeta.algorithms", "distmeta.models", "distmeta.tasks", "distmeta.runtime", "distmeta.data")
    assert not {m for m in _imports("distmeta.config") if m.startswith(components)}
    for core in ("distmeta.algorithms", "distmeta.models", "distmeta.tasks", "distmeta.params", "distmeta.rl.local"):
        loaded = _imports(core)
        assert "ray" not in loaded and not {m for m in loaded if m.startswith("distmeta.runtime")}, core
    # what a step means runs without Ray too: the meta-optimizer, and the loop of runtime/local.py
    # that tests and benchmarks hold the system to (the parameter server and the worker with it)
    for ray_free in ("distmeta.runtime.meta_optimizer", "distmeta.runtime.local"):
        assert "ray" not in _imports(ray_free), ray_free


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["algorithm.name=protonet", "algorithm.inner_steps=5"],
            r"inner_steps=5: protonet does not read it.*reads none of them",
        ),
        (["algorithm.name=protonet", "eval.inner_batch_size=2"], "protonet has no inner loop to batch"),
        (["algorithm.name=matchingnet", "algorithm.fce_steps=9"], "fce_steps=9 sets .*: add algorithm.fce=true"),
        (["algorithm.name=maml", "algorithm.head_init=zero"], "head_init=zero: maml does not read it"),
        (["algorithm.name=maml", "algorithm.fce=true"], r"algorithm.fce=True: maml does not read it, so it would"),
        (["algorithm.name=maml", "algorithm.finetune=all"], r"finetune=all: maml .*\(it reads algorithm.inner_lr, "),
        (
            ["algorithm.name=baseline", "task.labels=class", "algorithm.inner_batch_size=3"],
            r"inner_batch_size=3: baseline does not read it.*\(it reads algorithm.inner_lr, "
            r"algorithm.inner_steps, algorithm.inner_optimizer, algorithm.finetune, algorithm.head_init\)",
        ),
    ],
)
def test_a_setting_the_learner_does_not_read_is_refused_not_ignored(overrides, message):
    """Set away from its default, it would change nothing: the user would believe the method changed.
    A new run is refused; a trained checkpoint's config (evaluate, resume) is not asked again."""
    from distmeta.assemble import check_new_run

    with pytest.raises(ConfigError, match=message):
        check_new_run(checked("task.source=synthetic", "model.name=conv4", *overrides))
    check_new_run(checked("task.source=synthetic", "model.name=conv4", overrides[0], *overrides[1:-1]))  # fine
