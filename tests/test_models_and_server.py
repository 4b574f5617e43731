"""Model shapes for the paper variants, and the parameter server's aggregation and outer steps,
in one process (no Ray)."""

import dataclasses
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch

from distmeta.checkpoint import CheckpointStore, step_name
from distmeta.config import ConfigError, ModelConfig, load_config
from distmeta.models import MODELS, DataSpec, build_model
from distmeta.params import ParamLayout, flat_parameters, shard_bounds
from distmeta.runtime.control import StepControl, WorkerTiming, WorkerUpdate
from distmeta.runtime.meta_optimizer import checkpoint_state
from distmeta.runtime.parameter_server import ParameterServer, join_metrics


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_sinusoid_mlp_is_1_40_40_1():
    model = build_model(ModelConfig(), DataSpec((1,), 1))
    assert [tuple(p.shape) for p in model.parameters()] == [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]
    assert model(torch.zeros(7, 1)).shape == (7, 1)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_model_class_says_what_its_modules_are(name):
    """What the rest of the code asks of a model it reads from the class (before any is built): the
    attributes must say what the built module is."""
    from torch import nn

    from distmeta.algorithms import batched

    cls = MODELS[name]
    spec = DataSpec((1,), 1) if cls.task_kind == "regression" else DataSpec((1, 28, 28), 5)
    model = build_model(ModelConfig(name=name), spec)
    assert type(model) is cls
    assert batched.supports(model) == batched.supports(model.features) == cls.linear_layers
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) == cls.batch_norm


@pytest.mark.parametrize(
    "filters, downsample, shape, ways, features",
    [
        (64, "stride", (1, 28, 28), 5, 64 * 2 * 2),  # Omniglot, MAML's strided variant: 28-14-7-4-2
        (64, "max_pool", (1, 28, 28), 20, 64 * 1 * 1),  # Omniglot with pooling: 28-14-7-3-1
        (32, "max_pool", (3, 84, 84), 5, 32 * 5 * 5),  # mini-ImageNet: 84-42-21-10-5
    ],
)
def test_conv4_variants(filters, downsample, shape, ways, features):
    model = build_model(ModelConfig(name="conv4", filters=filters, downsample=downsample), DataSpec(shape, ways))
    assert model.head.in_features == features
    assert model(torch.rand(3, *shape)).shape == (3, ways)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.features if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == 4 and all(c.kernel_size == (3, 3) and c.out_channels == filters for c in convs)
    assert len(norms) == 4 and not any(n.track_running_stats for n in norms)  # batch statistics only
    assert all(count(m) == 0 for m in model.buffers())


def test_param_layout_round_trip_is_views():
    model = build_model(ModelConfig(name="conv4", filters=8), DataSpec((1, 28, 28), 5))
    layout = ParamLayout.of(dict(model.named_parameters()))
    flat = flat_parameters(dict(model.named_parameters()), torch.float32)
    views = layout.unflatten(flat)
    assert layout.size == count(model) == flat.numel()
    assert all(v.data_ptr() >= flat.data_ptr() for v in views.values())  # no copies
    assert torch.equal(layout.flatten(views), flat)
    with pytest.raises(ValueError, match="the model needs"):
        layout.unflatten(flat[:-1])


def result(step, rank, update, num_tasks):
    return WorkerUpdate(
        step=step,
        generation=0,
        draw=step,
        update=np.asarray(update, dtype=np.float64),
        finite=bool(np.isfinite(update).all()),
        first_task=0,
        metrics={"loss_before": 2.0 * num_tasks, "loss_after": 1.0 * num_tasks},
        implementation="vmap",
        timing=WorkerTiming(rank, num_tasks, 0.0, 0.0, 0.0),
    )


def test_uneven_shares_are_weighted_by_task_count_and_reptile_steps_towards_phi():
    cfg = load_config(
        None, ["meta_optimizer.name=sgd", "meta_optimizer.lr=0.5", "train.dtype=float64", "train.steps=3"]
    )
    server = ParameterServer(cfg, np.zeros(2))
    # updates are sums over each worker's tasks of (theta - phi); 3 + 1 tasks
    metrics = server.apply(StepControl(0), result(0, 0, [3.0, -3.0], 3), result(0, 1, [5.0, 1.0], 1))
    mean = np.array([8.0, -2.0]) / 4  # mean over the 4 tasks of (theta - phi)
    np.testing.assert_allclose(server.parameters(), -0.5 * mean)  # theta + eps * mean(phi - theta)
    assert metrics.num_tasks == 4 and metrics.train == {"loss_before": 2.0, "loss_after": 1.0}


def test_outer_step_size_anneals_linearly_to_its_final_value():
    cfg = load_config(
        None,
        [
            "meta_optimizer.name=sgd",
            "meta_optimizer.lr=1.0",
            "meta_optimizer.final_lr=0.0",
            "train.steps=5",
            "train.dtype=float64",
        ],
    )
    server = ParameterServer(cfg, np.zeros(1))
    lrs = [server.apply(StepControl(s), result(s, 0, [-1.0], 1)).lr for s in range(5)]
    assert lrs == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])  # step i of n at i / n, as Reptile's code
    assert server.parameters()[0] == pytest.approx(sum(lrs))


def test_step_decay_multiplies_the_learning_rate_every_n_steps():
    overrides = ["meta_optimizer.name=sgd", "meta_optimizer.lr=1.0", "meta_optimizer.decay_every=2"]
    cfg = load_config(None, [*overrides, "meta_optimizer.decay_factor=0.5", "train.steps=5", "train.dtype=float64"])
    server = ParameterServer(cfg, np.zeros(1))
    lrs = [server.apply(StepControl(s), result(s, 0, [-1.0], 1)).lr for s in range(5)]
    assert lrs == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25])  # the ProtoNets schedule, in miniature
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, [*overrides, "meta_optimizer.final_lr=0.1"])


def test_the_server_refuses_updates_for_another_step():
    server = ParameterServer(load_config(None, ["train.dtype=float64"]), np.zeros(1))
    with pytest.raises(RuntimeError, match="at step 0 but got updates for steps \\[3\\]"):
        server.apply(StepControl(0), result(3, 0, [1.0], 1))


def test_finite_updates_whose_sum_overflows_are_rejected_too():
    server = ParameterServer(load_config(None, ["train.dtype=float64"]), np.zeros(2))
    huge = np.finfo(np.float64).max
    with np.errstate(over="ignore"):
        metrics = server.apply(StepControl(0), result(0, 0, [huge, 0.0], 1), result(0, 1, [huge, 0.0], 1))
    assert [bad.rank for bad in metrics.rejected] == [0, 1]  # each finite, their sum is not
    np.testing.assert_array_equal(server.parameters(), [0.0, 0.0])  # nothing applied
    assert server.apply(StepControl(1), result(1, 0, [1.0, -1.0], 1)).rejected == []
    assert server.parameters()[0] < 0 < server.parameters()[1]
    shard = ParameterServer(load_config(None, ["train.dtype=float64"]), np.zeros(128), bounds=(64, 128))
    big = [result(0, rank, np.r_[np.zeros(64), huge, np.zeros(63)][64:], 1) for rank in range(2)]
    with pytest.raises(FloatingPointError, match="overflowed in parameters 64..127"), np.errstate(over="ignore"):
        shard.apply(StepControl(0), *big)  # a shard cannot tell the others: it stops the run


def test_the_server_publishes_parameters_and_sends_its_state_at_checkpoint_steps():
    cfg = load_config(None, ["train.dtype=float64"])
    server = ParameterServer(cfg, np.zeros(3))
    metrics = server.apply(
        StepControl(0, checkpoint="step_00000001.pt", publish=True), result(0, 0, [1.0, 2.0, 3.0], 1)
    )
    np.testing.assert_array_equal(metrics.params, server.parameters())
    assert metrics.checkpoint == "step_00000001.pt"  # the driver writes it (train.StepResults)
    saved = checkpoint_state(cfg, [metrics.state])
    assert saved["step"] == 1 and torch.equal(saved["params"], torch.from_numpy(server.parameters()))
    assert saved["config"] == cfg.to_dict() and saved["task_stream"]["next_step"] == 1


def test_sharded_servers_compute_what_one_server_does_and_checkpoint_as_one(tmp_path):
    """Three shards of a 327-vector (64-aligned slices) against one server, Adam, float64, with
    uneven task counts and a rejected step: the same parameters bit for bit, and a checkpoint of
    the shards that a single server (or another number of shards) resumes from."""
    cfg = load_config(None, ["train.dtype=float64", "meta_optimizer.lr=0.1"])
    initial = np.linspace(-1.0, 1.0, 327)
    bounds = shard_bounds(327, 3)
    assert bounds == [(0, 128), (128, 256), (256, 327)]
    single = ParameterServer(cfg, initial)
    shards = [ParameterServer(cfg, initial, bounds=b) for b in bounds]
    rng = np.random.default_rng(0)
    for step in range(6):
        updates = [rng.standard_normal(327) for _ in range(2)]
        if step == 3:
            updates[1][300] = np.nan  # in shard 2's slice only: every shard must reject the step
        results = [result(step, rank, u, num_tasks=rank + 1) for rank, u in enumerate(updates)]
        whole = single.apply(StepControl(step, checkpoint="c.pt" if step == 5 else None), *results)
        parts = [
            shard.apply(
                StepControl(step, checkpoint="c.pt" if step == 5 else None),
                *[dataclasses.replace(r, update=r.update[lo:hi]) for r in results],
            )
            for shard, (lo, hi) in zip(shards, bounds)
        ]
        assert join_metrics(parts).rejected == whole.rejected
        np.testing.assert_array_equal(np.concatenate([shard.parameters() for shard in shards]), single.parameters())
    assert single.meta.rejected_steps == [3] and all(shard.meta.rejected_steps == [3] for shard in shards)
    store = CheckpointStore(str(tmp_path))
    store.write(step_name(6), checkpoint_state(cfg, join_metrics(parts).state))
    resumed = ParameterServer(cfg, np.zeros(327), str(tmp_path))  # one server from the shards' checkpoint
    np.testing.assert_array_equal(resumed.parameters(), single.parameters())
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(
            resumed.meta.optimizer.state[resumed.meta.theta][key], single.meta.optimizer.state[single.meta.theta][key]
        )
    two = [ParameterServer(cfg, np.zeros(327), str(tmp_path), b) for b in shard_bounds(327, 2)]  # and two shards
    np.testing.assert_array_equal(np.concatenate([s.parameters() for s in two]), single.parameters())
    assert {s.step for s in two} == {6}
    with pytest.raises(ValueError, match=r"at most 6 \(one per 64 parameters\)"):
        shard_bounds(327, 7)


def test_auto_implementation_is_the_measured_faster_one_and_stays_chosen():
    from distmeta.algorithms import fastest_implementation
    from distmeta.runtime.task_generator import TaskGenerator
    from distmeta.runtime.worker import Worker

    cfg = load_config(None, ["train.meta_batch_size=8"])
    worker = Worker(cfg, device=torch.device("cpu"))
    tasks = TaskGenerator(cfg, [8], [0], prefetch=False).build(0)[0]
    flat = flat_parameters(worker.algorithm.initial_parameters(), torch.float32).numpy()
    chosen, timings = fastest_implementation(
        worker.algorithm, worker._params(flat), tasks.to_torch(worker.device, torch.float32)
    )
    assert set(timings) == set(worker.algorithm.implementations()) >= {"vmap", "loop", "batched"}
    assert chosen == min(timings, key=timings.get)
    assert worker.implementation == "auto"
    first = worker.compute(StepControl(0), tasks, flat)
    assert worker.implementation in timings and first.implementation == worker.implementation
    other = "loop" if worker.implementation != "loop" else "vmap"
    expected, _ = worker.algorithm.batch_update(
        worker._params(flat), tasks.to_torch(worker.device, torch.float32), other
    )
    np.testing.assert_allclose(first.update, worker.layout.flatten(expected).numpy(), rtol=1e-4, atol=1e-6)


def test_a_worker_started_after_auto_chose_computes_with_the_runs_choice():
    """A worker a fault's recovery starts anew does not time the implementations again (it might
    choose one that rounds differently): the control message carries the run's choice."""
    from distmeta.runtime.task_generator import TaskGenerator
    from distmeta.runtime.worker import Worker

    cfg = load_config(None, ["train.meta_batch_size=4", "algorithm.implementation=auto"])
    tasks = TaskGenerator(cfg, [4], [0], prefetch=False).build(0)[0]
    for chosen in ("loop", "vmap"):  # timing cannot give both
        worker = Worker(cfg, device=torch.device("cpu"))
        flat = flat_parameters(worker.algorithm.initial_parameters(), torch.float32).numpy()
        assert worker.compute(StepControl(0, implementation=chosen), tasks, flat).implementation == chosen


def test_bf16_autocast_is_an_option_close_to_float32_and_only_with_float32_parameters():
    """train.autocast=bf16 changes the math (so it is off by default), but not by much: the same
    Conv4 update, in the same direction, from bfloat16 kernels. Metrics and the update stay float32."""
    from distmeta.runtime.task_generator import TaskGenerator
    from distmeta.runtime.worker import Worker

    tiny = ["task.source=synthetic", "model.name=conv4", "model.filters=8", "model.downsample=stride"]
    tiny += ["train.meta_batch_size=2", "algorithm.inner_lr=0.1", "algorithm.implementation=loop"]
    updates = {}
    for mode in ("none", "bf16"):
        cfg = load_config(None, [*tiny, f"train.autocast={mode}"])
        torch.manual_seed(0)
        worker = Worker(cfg, device=torch.device("cpu"))
        tasks = TaskGenerator(cfg, [2], [0], prefetch=False).build(0)[0]
        flat = flat_parameters(worker.algorithm.initial_parameters(), torch.float32).numpy()
        result = worker.compute(StepControl(0), tasks, flat)
        assert result.update.dtype == np.float32 and set(result.metrics) >= {"loss_before", "loss_after"}
        updates[mode] = result.update
    assert not np.array_equal(updates["none"], updates["bf16"])  # reduced precision really ran
    cosine = updates["none"] @ updates["bf16"] / np.linalg.norm(updates["none"]) / np.linalg.norm(updates["bf16"])
    assert cosine > 0.99
    with pytest.raises(ConfigError, match="train.autocast=bf16 computes in reduced precision: use train.dtype=float32"):
        load_config(None, ["train.autocast=bf16", "train.dtype=float64"])


def test_under_bf16_autocast_scores_and_matching_probabilities_keep_float32():
    """A bf16 mean over a task's queries is off by a tenth of a point (74/75 of 32 tasks summed to
    31.625, not 31.573), and Matching Networks' class probabilities rounded to 8 bits before their
    log: both are computed in float32 under autocast."""
    from distmeta.algorithms.matchingnet import MatchingNetworks

    cfg = load_config(None, ["task.source=synthetic", "model.name=conv4", "algorithm.name=matchingnet"])
    learner = MatchingNetworks(cfg.algorithm, build_model(cfg.model, DataSpec((1, 28, 28), 0)), "classification")
    output = torch.randn(32, 75, 5).to(torch.bfloat16)
    y = output.argmax(-1)
    y[:, 0] = (y[:, 0] + 1) % 5  # one query of each task wrong: 74/75
    with torch.autocast("cpu", torch.bfloat16):
        accuracy = learner.scores(output, y)["accuracy"]
        support, query = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
        one_hot = torch.eye(5).expand(2, 5, 5)
        log_p = learner.logits({}, support, one_hot, query)
        cosine = torch.nn.functional.normalize(query, dim=-1) @ torch.nn.functional.normalize(support, dim=-1).mT
    assert accuracy.dtype == torch.float32 and accuracy.sum().item() == pytest.approx(32 * 74 / 75, rel=1e-6)
    assert cosine.dtype == torch.bfloat16  # the products stay bf16; what follows them does not
    assert log_p.dtype == torch.float32
    torch.testing.assert_close(log_p, (cosine.float().softmax(-1) @ one_hot).log(), rtol=0, atol=0)


def test_bf16_autocast_warns_where_the_cpu_only_emulates_bfloat16(caplog, monkeypatch):
    """Without AVX-512 BF16 or AMX, oneDNN emulates bfloat16: the option then slows a step down many
    times (0.09x the float32 plain loop on an AVX2-only EPYC), so the worker says so."""
    from distmeta.runtime import worker as worker_module

    worker_module._warn_once.cache_clear()
    cfg = load_config(None, ["train.autocast=bf16"])
    worker = worker_module.Worker(cfg, device=torch.device("cpu"))
    for native, warned in ((True, False), (False, True)):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        worker_module._native_bf16.cache_clear()  # the worker asks the CPU once
        caplog.clear()
        with worker.precision():
            pass
        assert ("without native bfloat16" in caplog.text) is warned


FREED_MEMORY = """
import resource, sys, torch
from distmeta.runtime.worker import keep_freed_memory

def faults_per_step():
    # a step's pattern: activations allocated, then all freed at its end; above 32 MB, the most
    # glibc's adaptive mmap threshold reaches, each gets an mmap of its own by default
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        activations = [torch.ones(40 << 18) for _ in range(2)]  # 40 MB each
        del activations
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10

default = faults_per_step()
assert keep_freed_memory(), "mallopt refused the settings"
faults_per_step()  # the heap grows to the step's size once
print(default, faults_per_step())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the settings are glibc's")
def test_a_cpu_worker_s_process_keeps_the_memory_a_step_frees_instead_of_faulting_it_in_again():
    """In a fresh process: glibc's defaults map and unmap each 40 MB block, so every step faults
    2 x 10,240 pages in again."""
    out = subprocess.run([sys.executable, "-c", FREED_MEMORY], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    default, kept = map(float, out.stdout.split())
    assert default > 15_000 and kept < 100, (default, kept)


@pytest.mark.skipif(sys.platform != "linux", reason="the settings are glibc's")
def test_a_cpu_worker_actor_keeps_the_memory_its_compute_thread_frees(ray_local, tmp_path, monkeypatch):
    """The workers the supervisor starts get the malloc settings at their process's start, where
    they hold for every thread's allocations: without them an 80 MB block faults in 20,480 pages
    each time on a thread that is not the main one, whatever ``mallopt`` said."""
    from distmeta.algorithms import initial_parameters
    from distmeta.runtime import supervisor as supervisor_module
    from distmeta.runtime.supervisor import Supervisor
    from distmeta.runtime.worker import worker_process_env
    from distmeta.tasks import build_source

    # A worker process of its own, as a run's first worker is: the shared Ray of the test session may
    # otherwise hand the supervisor a pooled process with the same environment that earlier tests
    # have used for hours (in one full run its 80 MB blocks faulted in 16,384 pages each, alone 0).
    marker = {"DISTMETA_TEST_PROCESS": uuid.uuid4().hex}
    monkeypatch.setattr(supervisor_module, "worker_process_env", lambda: worker_process_env() | marker)

    def faults_on_a_thread_of_its_own(block_mb: int = 80, steps: int = 40) -> float:
        """Page faults per step of a thread that allocates and frees an activation above glibc's
        64 MB arena heaps (mini-ImageNet's first layer is 72 MB), as a compiled graph's thread does."""
        import resource
        import threading

        faults = []

        def steps_on_this_thread():
            for _ in range(steps):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                activation = torch.ones(block_mb << 18)
                del activation
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

        thread = threading.Thread(target=steps_on_this_thread)
        thread.start()
        thread.join()
        # The fewest of the last steps (the heap's first steps touch its fresh top pad once): Ray's
        # own threads allocate from the same heap, and on a loaded machine one of their blocks can
        # land in the freed 80 MB between two steps, which then fault a whole block in (in one CI
        # run beside a training run: 3 of the last 5 steps, 20,480 pages each, the other two none).
        # Without the settings every step faults its block in.
        return min(faults[-30:])

    cfg = load_config(None, ["cluster.num_workers=1", "cluster.cpus_per_worker=1", "cluster.gpus_per_worker=0"])
    initial = initial_parameters(cfg, build_source(cfg.task))
    supervisor = Supervisor(cfg, initial, str(tmp_path))
    try:
        kept = ray_local.get(supervisor.workers[0].__ray_call__.remote(lambda _: faults_on_a_thread_of_its_own()))
    finally:
        supervisor.close()
    # a fresh process without the settings (an environment of its own: no pooled worker whose heap has been used)
    fresh = {"env_vars": {"DISTMETA_TEST_PROCESS": uuid.uuid4().hex}}
    bare = ray_local.get(ray_local.remote(num_cpus=0, runtime_env=fresh)(faults_on_a_thread_of_its_own).remote())
    assert bare > 10_000 and kept < 100, (bare, kept)
