import time

import numpy as np
import pytest
import torch

from distmeta.config import load_config
from distmeta.runtime.control import StepControl
from distmeta.runtime.task_generator import TaskGenerationError, TaskGenerator, generator_blocks, split_evenly
from distmeta.tasks import build_source, task_rng


def test_sinusoid_tasks_follow_the_paper_distribution():
    cfg = load_config()
    batch = build_source(cfg.task).sample(task_rng(0, "train", 0), 2000, "train", 10, 15)
    assert batch.support_x.shape == (2000, 10, 1) and batch.query_y.shape == (2000, 15, 1)
    x = np.concatenate([batch.support_x, batch.query_x], axis=1)
    y = np.concatenate([batch.support_y, batch.query_y], axis=1)
    assert x.min() >= -5 and x.max() <= 5
    # each task is A sin(x - phase) exactly, as the MAML code draws it: least squares on [sin x, cos x]
    # fits it to rounding (A sin(x - p) = A cos(p) sin(x) - A sin(p) cos(x)), A in [0.1, 5], phase in [0, pi]
    x, y = x[..., 0].astype(np.float64), y[..., 0].astype(np.float64)
    design = np.stack([np.sin(x), np.cos(x)], -1)  # [tasks, points, 2]
    coefficients = np.stack([np.linalg.lstsq(d, t, rcond=None)[0] for d, t in zip(design, y)])  # [tasks, 2]
    assert np.abs(np.einsum("tpk,tk->tp", design, coefficients) - y).max() < 1e-5  # float32 data
    a, b = coefficients.T
    amplitude, phase = np.hypot(a, b), np.arctan2(-b, a)
    assert amplitude.min() >= 0.1 - 1e-5 and amplitude.max() <= 5 + 1e-5
    assert phase.min() >= -1e-5 and phase.max() <= np.pi + 1e-5
    assert amplitude.min() < 0.3 and amplitude.max() > 4.7 and phase.min() < 0.1 and phase.max() > np.pi - 0.1


def test_batches_are_deterministic_per_step_and_streams_are_disjoint():
    source = build_source(load_config().task)
    a = source.sample(task_rng(7, "train", 3), 5, "train", 10, 10)
    b = source.sample(task_rng(7, "train", 3), 5, "train", 10, 10)
    c = source.sample(task_rng(7, "train", 4), 5, "train", 10, 10)
    d = source.sample(task_rng(7, "test", 3), 5, "test", 10, 10)
    assert np.array_equal(a.query_y, b.query_y)
    assert not np.array_equal(a.query_y, c.query_y) and not np.array_equal(a.query_y, d.query_y)


@pytest.mark.parametrize("source", ["sinusoid", "synthetic"])
def test_a_part_of_a_batch_is_exactly_those_tasks_of_the_whole(source):
    cfg = load_config(None, [f"task.source={source}", f"model.name={'mlp' if source == 'sinusoid' else 'conv4'}"])
    whole = build_source(cfg.task).sample(task_rng(0, "train", 3), 9, "train", 2, 3)
    part = build_source(cfg.task).sample(task_rng(0, "train", 3), 9, "train", 2, 3, slice(3, 7))
    for name in ("support_x", "support_y", "query_x", "query_y"):
        np.testing.assert_array_equal(getattr(part, name), getattr(whole, name)[3:7])


def test_synthetic_episodes_are_n_way_k_shot_with_permuted_labels():
    cfg = load_config(
        None, ["task.source=synthetic", "model.name=conv4", "task.ways=5", "task.shots=2", "task.queries=3"]
    )
    source = build_source(cfg.task)
    batch = source.sample(task_rng(0, "train", 0), 64, "train", 2, 3)
    assert batch.support_x.shape == (64, 10, 1, 28, 28) and batch.support_x.dtype == np.uint8
    assert batch.query_y.shape == (64, 15)
    for labels in batch.support_y:
        assert labels.tolist() == [0, 1, 2, 3, 4] * 2  # shot-major: one of each class, then the next shot
    # the same label means the same class within a task: support and query images match their class template
    templates = source.templates
    for t in range(4):
        for x, y in zip(batch.query_x[t], batch.query_y[t]):
            support_same = batch.support_x[t][batch.support_y[t] == y].astype(float)
            assert (
                np.abs(x.astype(float) - support_same.mean(0)).mean()
                < np.abs(x.astype(float) - templates.mean(0)).mean()
            )
    train, test = set(source.classes["train"]), set(source.classes["test"])
    assert not train & test


def test_uint8_images_become_unit_floats_on_the_device():
    cfg = load_config(None, ["task.source=synthetic", "model.name=conv4"])
    batch = build_source(cfg.task).sample(task_rng(0, "train", 0), 2, "train", 1, 1)
    sx, sy, _qx, _qy = batch.to_torch(torch.device("cpu"), torch.float32)
    assert sx.dtype == torch.float32 and sx.min() >= 0 and sx.max() <= 1 and sy.dtype == torch.long


@pytest.mark.parametrize("workers, generators", [(1, 1), (2, 1), (3, 1), (3, 2), (3, 3)])
def test_slices_cover_the_step_batch_whatever_the_split(workers, generators):
    cfg = load_config(None, ["train.meta_batch_size=7", "task.source=synthetic", "model.name=conv4"])
    whole = TaskGenerator(cfg, [7], [0], prefetch=False).build(5)[0]
    shares = split_evenly(7, workers)
    assert sum(shares) == 7 and max(shares) - min(shares) <= 1
    blocks = generator_blocks(workers, generators)
    assert sorted(r for block in blocks for r in block) == list(range(workers)) and len(blocks) == generators
    parts = {}
    for ranks in blocks:  # each generator builds only its own block's tasks
        generator = TaskGenerator(cfg, shares, ranks, start_draw=5)
        assert generator.part.stop - generator.part.start == sum(shares[r] for r in ranks)
        parts |= {rank: generator.batch_for(StepControl(5), rank) for rank in ranks}
    for name in ("support_x", "query_x", "query_y"):
        joined = np.concatenate([getattr(parts[rank], name) for rank in range(workers)])
        np.testing.assert_array_equal(joined, getattr(whole, name))


def test_prefetch_queue_is_bounded_and_ordered():
    cfg = load_config(None, ["cluster.prefetch_batches=3"])
    generator = TaskGenerator(cfg, [25], [0], start_draw=10)
    deadline = time.time() + 30  # filled ahead (however slow a loaded machine is) ...
    while generator.ready.qsize() < 3 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert generator.ready.qsize() == 3  # ... but no further
    assert generator.batch_for(StepControl(10), 0).support_x.shape[0] == 25
    with pytest.raises(RuntimeError, match="produced step 11 but step 13 was asked for"):
        generator.batch_for(StepControl(13), 0)


def test_a_failing_source_is_reported_to_the_worker_that_asks():
    cfg = load_config()
    cfg.task.queries = -20  # past validation on purpose: sampling fails inside the prefetch thread
    generator = TaskGenerator(cfg, [25], [0])
    with pytest.raises(TaskGenerationError, match="could not build step 0: ValueError: negative dimensions"):
        generator.batch_for(StepControl(0), 0)
    with pytest.raises(TaskGenerationError, match="could not build step 0"):  # again, not a wait on an empty queue
        generator.batch_for(StepControl(0), 0)


@pytest.mark.parametrize("algorithm", ["maml", "protonet"])
def test_evaluation_in_bounded_passes_scores_exactly_as_one_pass(monkeypatch, algorithm):
    """Held-out tasks go through the model a few at a time (memory stays bounded); the scores are those
    of all the tasks in one batch, since tasks share nothing."""
    from distmeta.runtime import worker

    overrides = ["task.source=synthetic", "model.name=conv4", "model.filters=8", "task.image_size=16"]
    cfg = load_config(None, [*overrides, f"algorithm.name={algorithm}", "train.dtype=float64", "eval.queries=4"])
    tasks = build_source(cfg.task).sample(task_rng(1, "test", 0), 7, "test", cfg.task.shots, 4)
    evaluator = worker.Worker(cfg, device=torch.device("cpu"))
    params = evaluator.layout.flatten(evaluator.algorithm.initial_parameters()).numpy()
    steps = [0] if algorithm == "protonet" else [0, 2]
    whole = evaluator.evaluate(params, tasks, steps)
    monkeypatch.setattr(worker, "EVAL_EXAMPLES_PER_PASS", 3 * (cfg.task.shots + 4) * cfg.task.ways)  # 3 tasks
    passes = evaluator.evaluate(params, tasks, steps)
    np.testing.assert_allclose(passes.accuracy, whole.accuracy, rtol=0, atol=0)
    np.testing.assert_allclose(passes.loss, whole.loss, rtol=1e-12, atol=1e-14)
