"""Model shapes for the paper variants, and the parameter server's aggregation and outer steps,
in one process (no Ray)."""

import numpy as np
import pytest
import torch

from distmeta.checkpoint import read_checkpoint
from distmeta.config import ConfigError, ModelConfig, load_config
from distmeta.models import DataSpec, build_model
from distmeta.params import ParamLayout, flat_parameters
from distmeta.runtime.control import StepControl
from distmeta.runtime.parameter_server import ParameterServer


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_sinusoid_mlp_is_1_40_40_1():
    model = build_model(ModelConfig(), DataSpec((1,), 1))
    assert [tuple(p.shape) for p in model.parameters()] == [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]
    assert model(torch.zeros(7, 1)).shape == (7, 1)


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
    return {
        "step": step,
        "rank": rank,
        "update": np.asarray(update, dtype=np.float64),
        "num_tasks": num_tasks,
        "first_task": 0,
        "metrics": {"loss_before": 2.0 * num_tasks, "loss_after": 1.0 * num_tasks},
        "implementation": "vmap",
        "produced_at": 0.0,
        "started": 0.0,
        "finished": 0.0,
    }


def test_uneven_shares_are_weighted_by_task_count_and_reptile_steps_towards_phi():
    cfg = load_config(
        None, ["meta_optimizer.name=sgd", "meta_optimizer.lr=0.5", "train.dtype=float64", "train.steps=3"]
    )
    server = ParameterServer(cfg, np.zeros(2))
    # updates are sums over each worker's tasks of (theta - phi); 3 + 1 tasks
    metrics = server.apply(StepControl(0), result(0, 0, [3.0, -3.0], 3), result(0, 1, [5.0, 1.0], 1))
    mean = np.array([8.0, -2.0]) / 4  # mean over the 4 tasks of (theta - phi)
    np.testing.assert_allclose(server.parameters(), -0.5 * mean)  # theta + eps * mean(phi - theta)
    assert metrics["num_tasks"] == 4 and metrics["train"] == {"loss_before": 2.0, "loss_after": 1.0}


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
    lrs = [server.apply(StepControl(s), result(s, 0, [-1.0], 1))["lr"] for s in range(5)]
    assert lrs == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert server.parameters()[0] == pytest.approx(sum(lrs))


def test_step_decay_multiplies_the_learning_rate_every_n_steps():
    overrides = ["meta_optimizer.name=sgd", "meta_optimizer.lr=1.0", "meta_optimizer.decay_every=2"]
    cfg = load_config(None, [*overrides, "meta_optimizer.decay_factor=0.5", "train.steps=5", "train.dtype=float64"])
    server = ParameterServer(cfg, np.zeros(1))
    lrs = [server.apply(StepControl(s), result(s, 0, [-1.0], 1))["lr"] for s in range(5)]
    assert lrs == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25])  # the ProtoNets schedule, in miniature
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, [*overrides, "meta_optimizer.final_lr=0.1"])


def test_the_server_refuses_updates_for_another_step():
    server = ParameterServer(load_config(None, ["train.dtype=float64"]), np.zeros(1))
    with pytest.raises(RuntimeError, match="at step 0 but got updates for steps \\[3\\]"):
        server.apply(StepControl(0), result(3, 0, [1.0], 1))


def test_the_server_publishes_parameters_and_writes_checkpoints_on_request(tmp_path):
    server = ParameterServer(load_config(None, ["train.dtype=float64"]), np.zeros(3), str(tmp_path / "ckpt"))
    control = StepControl(0, checkpoint="step_00000001.pt", publish=True)
    metrics = server.apply(control, result(0, 0, [1.0, 2.0, 3.0], 1))
    np.testing.assert_array_equal(metrics["params"], server.parameters())
    saved = read_checkpoint(metrics["checkpoint"])
    assert saved["step"] == 1 and torch.equal(saved["params"], torch.from_numpy(server.parameters()))
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step_00000001.pt"]  # no temporary file left


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
    assert set(timings) == {"vmap", "loop"} and chosen == min(timings, key=timings.get)
    assert worker.implementation == "auto"
    first = worker.compute(StepControl(0), flat, tasks)
    assert worker.implementation in ("vmap", "loop") and first["implementation"] == worker.implementation
    other = "loop" if worker.implementation == "vmap" else "vmap"
    expected, _ = worker.algorithm.batch_update(
        worker._params(flat), tasks.to_torch(worker.device, torch.float32), other
    )
    np.testing.assert_allclose(first["update"], worker.layout.flatten(expected).numpy(), rtol=1e-4, atol=1e-6)
