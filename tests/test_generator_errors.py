"""A task generator that fails mid-run (here: a shard truncated while the run reads it with pread)
stops the run within seconds with the generator's error named, under every engine; it used to
hang the compiled engine's driver for good (the generator's producer thread had stopped, so its
next call waited forever, and the graph's teardown waited for that call)."""

import threading
import time

import numpy as np
import pytest
from test_runtime import small

from distmeta.data.shards import ClassImages, write_shards
from distmeta.runtime.supervisor import ActorFailed
from distmeta.train import train


def tiny_shards(folder):
    rng = np.random.default_rng(0)
    classes = [ClassImages(f"c{i}", "g", rng.integers(0, 256, (6, 1, 8, 8), np.uint8)) for i in range(30)]
    write_shards(folder, classes, {"s/train": list(range(20)), "s/test": list(range(20, 30))})
    return folder


def truncate_after(checkpoint, shard, stop: threading.Event) -> None:
    """Cut the shard to its first bytes once the run has written ``checkpoint``."""
    while not checkpoint.exists() and not stop.is_set():
        time.sleep(0.01)
    with open(shard, "r+b") as f:
        f.truncate(1024)


@pytest.mark.parametrize("mode", ["cluster.engine=compiled", "cluster.engine=tasks", "train.mode=async"])
def test_a_shard_truncated_mid_run_stops_it_with_the_generator_s_error(ray_local, tmp_path, mode):
    shards = tiny_shards(tmp_path / "shards")
    cfg = small(
        "task.source=shards",
        f"task.shards={shards}",
        "task.split_scheme=s",
        "task.rotations=false",
        "task.map_shards_mb=0",  # read with pread: a truncated file shows as a short read, not SIGBUS
        "task.shots=1",
        "task.queries=1",
        "model.name=conv4",
        "model.filters=4",
        "model.downsample=stride",
        "train.steps=100000",
        "train.checkpoint_every=5",
        "eval.shots=[1]",
        "eval.queries=1",
        mode,
    )
    run_dir, stop = tmp_path / "run", threading.Event()
    saboteur = threading.Thread(
        target=truncate_after, args=(run_dir / "checkpoints" / "step_00000005.pt", shards / "shard-00000.arrow", stop)
    )
    saboteur.start()
    outcome: list[BaseException] = []

    def run():
        try:
            train(cfg, run_dir)
        except BaseException as err:
            outcome.append(err)

    trainer = threading.Thread(target=run, daemon=True)
    trainer.start()
    trainer.join(120)  # 100,000 steps would take many minutes: the run must stop at the truncation
    stop.set()
    saboteur.join()
    assert not trainer.is_alive(), "the run did not stop within 120 s of the shard being truncated"
    (err,) = outcome
    assert isinstance(err, ActorFailed), repr(err)
    message = str(err)
    assert "BadTaskData" in message and "could not build step" in message, message
    assert "ShardError: shard shard-00000.arrow ended early: truncated while in use?" in message, message
    assert "where the actor raised it" not in message  # bad data: the message says it all, no traceback


def test_an_actor_s_error_is_named_with_its_whole_message_not_ray_s_wrapper(ray_local, tmp_path):
    """A constructor's error reaches the driver only as text inside Ray's ActorDiedError; a call's
    as a RayTaskError around the original: both come out as the original's type and message."""
    import ray
    import ray.exceptions as rex

    from distmeta.checkpoint import CheckpointStore
    from distmeta.runtime.control import StepControl
    from distmeta.runtime.meta_optimizer import checkpoint_state
    from distmeta.runtime.parameter_server import ParameterServer
    from distmeta.runtime.supervisor import explain

    cfg = small()
    CheckpointStore(str(tmp_path)).write(
        "step_00000001.pt", checkpoint_state(cfg, [ParameterServer(cfg, np.zeros(3)).state()])
    )
    server = ray.remote(ParameterServer).options(num_cpus=0)
    with pytest.raises(rex.RayActorError) as died:  # its constructor loads a checkpoint of another model
        ray.get(server.remote(cfg, 5, str(tmp_path)).status.remote())
    assert (
        explain(died.value)
        == "CheckpointError in the actor's constructor: checkpoint holds 3 parameters, this model has 5"
    )
    with pytest.raises(rex.RayTaskError) as failed:
        ray.get(server.remote(cfg, np.zeros(5)).apply.remote(StepControl(4)))
    assert explain(failed.value) == ("RuntimeError: parameter server is at step 0 but got updates for steps []")


def test_a_bug_raised_in_an_actor_comes_with_its_traceback_and_bad_input_with_its_message_alone(ray_local):
    """A run stopped by an actor's error (not a fault) ends with ``explain``'s line and, unless the
    error is bad input whose message names the fix, the traceback from where the actor raised it."""
    import ray
    import ray.exceptions as rex

    from distmeta.config import ConfigError
    from distmeta.runtime.control import StepControl
    from distmeta.runtime.parameter_server import ParameterServer
    from distmeta.runtime.supervisor import actor_traceback

    server = ray.remote(ParameterServer).options(num_cpus=0).remote(small(), np.zeros(5))
    with pytest.raises(rex.RayTaskError) as failed:  # an internal inconsistency: a bug to trace
        ray.get(server.apply.remote(StepControl(4)))
    trace = actor_traceback(failed.value)
    assert trace.startswith("\n\nwhere the actor raised it:\n") and "parameter_server.py" in trace, trace
    assert "in apply" in trace and "RuntimeError: parameter server is at step 0" in trace, trace

    @ray.remote(num_cpus=0)
    def refuse():
        raise ConfigError("task.ways=9 exceeds the 5 classes of split 'test'")

    with pytest.raises(rex.RayTaskError) as refused:
        ray.get(refuse.remote())
    assert actor_traceback(refused.value) == ""
