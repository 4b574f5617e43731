"""Faults during training on a real local Ray: processes of the run's own actors are killed
(SIGKILL) or frozen (SIGSTOP) mid-run. Every run must reach its last step with the parameters of
the same run left alone: a step is applied whole or not at all, and re-run with the same tasks."""

import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_runtime import in_process, saved_params, small

from distmeta.train import train


def processes(role: str) -> list[psutil.Process]:
    """This test's actors of class ``role`` (their raylet is our child; other runs' are not)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if " ".join(process.cmdline()).startswith(f"ray::{role}"):
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


@contextlib.contextmanager
def ray_logs(caplog):
    """Ray's log records into ``caplog`` (Ray's loggers do not propagate to the root)."""
    ray_log = logging.getLogger("ray")
    ray_log.addHandler(caplog.handler)
    try:
        yield
    finally:
        ray_log.removeHandler(caplog.handler)


class Saboteur(threading.Thread):
    """Each time the run writes a checkpoint in ``at_steps``, sends ``signum`` to one actor of
    class ``role`` (a random one)."""

    def __init__(self, run_dir, role: str, at_steps, signum=signal.SIGKILL):
        super().__init__(daemon=True)
        self.folder, self.role, self.signum = run_dir / "checkpoints", role, signum
        self.pending, self.hits = sorted(at_steps), []

    def run(self):
        deadline = time.time() + 600
        while self.pending and time.time() < deadline:
            if (self.folder / f"step_{self.pending[0]:08d}.pt").exists():
                victims = processes(self.role)
                if victims:
                    victim = random.Random(self.pending[0]).choice(victims)
                    os.kill(victim.pid, self.signum)
                    self.hits.append((self.pending.pop(0), victim.pid))
            time.sleep(0.01)


# Conv4 on synthetic images, small enough to train in seconds; its float64 parameters (228 KB) are
# above Ray's 100 KB limit for arguments passed inline, as every real image model's are.
CONV4 = [
    "task.source=synthetic",
    "model.name=conv4",
    "model.filters=32",
    "model.downsample=stride",
    "task.image_size=8",
    "task.num_classes=50",
    "task.shots=1",
    "task.queries=2",
    "algorithm.inner_lr=0.1",
    "eval.shots=[1]",
    "eval.queries=2",
    "train.steps=100",
    # one worker: the reference below adapts all 7 tasks in one batch, and a convolution's sums
    # over a batch of 4 and one of 3 differ from those over all 7 by rounding (1e-9 after 100 steps)
    "cluster.num_workers=1",
]
MODELS = {"sinusoid": [], "conv4": CONV4}


def fault_free(cfg) -> np.ndarray:
    """The run's parameters without faults (and without Ray), computed on one thread as the workers
    compute (cluster.cpus_per_worker=1): a convolution's sums run in another order on two threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return in_process(cfg)[0]
    finally:
        torch.set_num_threads(threads)


def faulty_run(tmp_path, role, at_steps, *overrides, signum=signal.SIGKILL):
    cfg = small("train.steps=300", "cluster.num_workers=2", "train.checkpoint_every=25", *overrides)
    saboteur = Saboteur(tmp_path / "run", role, at_steps, signum)
    saboteur.start()
    result = train(cfg, tmp_path / "run")
    assert saboteur.hits, f"the run ended before any {role} was hit"
    return cfg, result, saboteur


# Each mode once, Conv4 where its size matters (constructor arguments past Ray's inline limit):
# each case is a 25 s run on this 2-core VM.
@pytest.mark.parametrize("engine, model", [("tasks", "sinusoid"), ("allreduce", "sinusoid"), ("compiled", "conv4")])
def test_a_killed_worker_restarts_and_the_run_ends_as_if_nothing_happened(ray_local, tmp_path, engine, model, caplog):
    """All-reduce: every worker starts afresh from the checkpoint, and the steps since are re-run;
    its calls are of 4 steps, so that checkpoints (every 25) fall inside calls."""
    allreduce = ["cluster.reduce=allreduce", "cluster.steps_per_call=4"]
    mode = allreduce if engine == "allreduce" else [f"cluster.engine={engine}"]
    ray_log = logging.getLogger("ray")  # Ray's loggers do not propagate to the root
    ray_log.addHandler(caplog.handler)
    try:
        cfg, result, saboteur = faulty_run(tmp_path, "Worker", [50], *mode, *MODELS[model])
    finally:
        ray_log.removeHandler(caplog.handler)
    assert result.recoveries == len(saboteur.hits) == 1
    assert "Unhandled error" not in caplog.text  # the fault is reported once, not once per dropped step
    expected = fault_free(cfg)
    np.testing.assert_allclose(saved_params(result), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "engine, shards, model",
    [  # each engine, model and number of shards at least once (each case is a 25 s run)
        ("compiled", 2, "sinusoid"),
        ("compiled", 1, "conv4"),  # the defect was in both engines
        ("tasks", 1, "conv4"),
    ],
)
def test_a_killed_parameter_server_restarts_from_its_checkpoint(
    ray_local, tmp_path, engine, shards, model, capfd, caplog
):
    """With 2 shards one is killed: the other goes back to the checkpoint the restarted one loaded.
    Conv4's parameters are too large to travel inline in a creation task, which a restart repeats:
    the server must not take them as a constructor argument (Ray frees those from its store)."""
    with ray_logs(caplog):
        cfg, result, _ = faulty_run(
            tmp_path,
            "ParameterServer",
            [50],
            f"cluster.engine={engine}",
            f"cluster.server_shards={shards}",
            *MODELS[model],
        )
    assert result.recoveries == 1
    assert "Error cancelling worker task" not in caplog.text  # no cancel sent to the dead server's graph loop
    out, err = capfd.readouterr()  # file descriptors: Ray's core worker writes to stderr itself
    assert "constructor arguments in the object store" not in err  # Ray's warning of exactly that
    assert "continuing at step 50 " in out or "continuing at step 75 " in out  # its newest checkpoint
    expected = fault_free(cfg)
    np.testing.assert_allclose(saved_params(result), expected, rtol=1e-10, atol=1e-12)


def test_a_killed_task_generator_is_rebuilt_at_the_step_it_was_at(ray_local, tmp_path):
    cfg, result, _ = faulty_run(tmp_path, "TaskGenerator", [50], "cluster.engine=tasks")
    assert result.recoveries == 1
    expected = fault_free(cfg)
    np.testing.assert_allclose(saved_params(result), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("engine", ["tasks", "compiled"])
def test_a_stuck_worker_is_a_straggler_its_step_is_re_run(ray_local, tmp_path, capsys, caplog, engine):
    """SIGSTOP freezes a worker mid-run; the step times out (straggler_factor x the step time, at
    least 5 s), the frozen worker is restarted, and the step re-run."""
    started = time.time()
    with ray_logs(caplog):
        cfg, result, saboteur = faulty_run(
            tmp_path, "Worker", [50], f"cluster.engine={engine}", "cluster.rejoin_timeout_s=15", signum=signal.SIGSTOP
        )
    assert "Error cancelling worker task" not in caplog.text  # the frozen actor's loop ended with its kill
    for _, pid in saboteur.hits:  # if Ray has not killed the frozen process yet, it does not outlive the test
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert result.recoveries == 1 and "recovered from a fault" in capsys.readouterr().out
    assert time.time() - started < 240  # a frozen worker costs a minute or two, not the 600 s step timeout
    expected, _ = in_process(cfg)
    np.testing.assert_allclose(saved_params(result), expected, rtol=1e-10, atol=1e-12)


def test_soak_two_hundred_steps_with_a_worker_killed_every_forty(ray_local, tmp_path):
    kills = list(range(40, 200, 40))
    cfg, result, saboteur = faulty_run(
        tmp_path, "Worker", kills, "train.steps=200", "cluster.num_workers=3", "train.checkpoint_every=20"
    )
    assert len(saboteur.hits) == len(kills) and result.recoveries == len(kills)
    events = EventAccumulator(str(result.run_dir))
    events.Reload()
    assert max(e.value for e in events.Scalars("faults/recovered")) == len(kills)
    logged = [e.step for e in events.Scalars("train/loss_after")]
    assert logged == sorted(set(logged)) and logged[-1] == 200  # every window once, none twice
    expected, _ = in_process(cfg)
    np.testing.assert_allclose(saved_params(result), expected, rtol=1e-10, atol=1e-12)


NODE_LOSS = """
import json, sys, threading, time
from pathlib import Path
import numpy as np, ray
from ray.cluster_utils import Cluster
from test_runtime import in_process, saved_params, small
from distmeta.runtime.cluster import ray_system_config
from distmeta.train import train

run_dir = Path(sys.argv[1])
# the head runs the server and the generators only
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                        "_system_config": ray_system_config()})
nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]  # one worker each
ray.init(address=cluster.address, log_to_driver=False)
cfg = small("train.steps=1000", "cluster.num_workers=2", "cluster.rejoin_timeout_s=10", "train.checkpoint_every=50",
            "cluster.engine=tasks", f"cluster.address={cluster.address}")
events, results = [], []
# Cluster.add_node needs the main thread (it installs signal handlers): train in another one
trainer = threading.Thread(target=lambda: results.append(train(cfg, run_dir)))
trainer.start()

def wait_for(name):
    while not (run_dir / "checkpoints" / name).exists():
        if not trainer.is_alive():  # its traceback is on stderr already
            sys.exit(f"training stopped before writing {name}")
        time.sleep(0.01)

wait_for("step_00000050.pt")
cluster.remove_node(nodes[1])
events.append("removed")
wait_for("step_00000100.pt")
cluster.add_node(num_cpus=1)
events.append("added")
trainer.join()
result = results[0]
expected, _ = in_process(cfg)
ray.shutdown()
cluster.shutdown()
print(json.dumps({"events": events, "recoveries": result.recoveries,
                  "max_diff": float(np.max(np.abs(saved_params(result) - expected)))}))
"""


def test_a_lost_node_s_share_is_re_split_and_its_worker_rejoins_when_a_node_returns(tmp_path, cli_env):
    """A 3-node cluster on this machine (ray.cluster_utils.Cluster): one worker node is removed
    mid-run, the other worker takes the whole meta-batch; a node is added back and the second
    worker rejoins. The run ends with the parameters of the fault-free run (up to rounding: the
    same tasks, summed in other groups while one worker was gone)."""
    env = dict(cli_env, RAY_AUTH_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env["PYTHONPATH"]])
    try:  # under pytest's own 600 s, so that a run that does not end shows its output
        command = [sys.executable, "-c", NODE_LOSS, str(tmp_path / "run")]
        out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=480)
    except subprocess.TimeoutExpired as late:
        output = (late.stdout or "")[-3000:] + (late.stderr or "")[-3000:]
        pytest.fail(f"the run did not end in {late.timeout:g} s:\n{output}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["events"] == ["removed", "added"] and report["recoveries"] >= 1
    assert "going on without it" in out.stderr and "is back: re-splitting the meta-batch over 2 workers" in out.stderr
    assert "with 1 worker(s), tasks [7]" in out.stdout
    assert report["max_diff"] < 1e-9
