"""Faults that used to end a run the wrong way: a lone stuck worker gave up the run, a full disk
crashed the driver (SIGSEGV) or printed a traceback. Real local Ray, real frozen processes, real
EFBIG write errors from the file-size limit (RLIMIT_FSIZE, as a full disk fails writes with ENOSPC)."""

import contextlib
import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from test_faults import faulty_run
from test_runtime import in_process, saved_params

from distmeta.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_lone_stuck_worker_is_restarted_and_the_run_goes_on(ray_local, tmp_path, capsys):
    """One worker of 2 CPUs (auto picks the tasks engine) frozen with SIGSTOP: the split cannot go
    on without it, so the run waits for it restarted (it gave up with exit 2 before)."""
    cfg, result, saboteur = faulty_run(
        tmp_path,
        "Worker",
        [50],
        "cluster.num_workers=1",
        "cluster.cpus_per_worker=2",
        "cluster.rejoin_timeout_s=20",  # room for the restart (Supervisor._kill) on a loaded machine
        "cluster.step_timeout_s=60",
        signum=signal.SIGSTOP,
    )
    for _, pid in saboteur.hits:  # if Ray has not killed the frozen process yet, it does not outlive the test
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    out = capsys.readouterr().out
    assert "| 1 worker x 2 CPU (auto: gpus_per_worker) | tasks engine |" in out
    assert result.recoveries == 1 and "with 1 worker(s), tasks [7]" in out
    expected, _ = in_process(cfg)
    np.testing.assert_allclose(saved_params(result), expected, rtol=1e-10, atol=1e-12)


def launch_then_fill_the_disk(tmp_path, env, appears: str, limit: int, *args):
    """Run launch.py; as soon as a file matching ``appears`` (in the run folder) exists, limit the
    driver's file size to ``limit`` bytes. Its actors (the raylet's children) keep writing freely."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "launch.py", "--logdir", str(tmp_path), "run_name=run", *args]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not glob.glob(str(run_dir / appears)) and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    limited = process.poll() is None
    if limited:
        psutil.Process(process.pid).rlimit(psutil.RLIMIT_FSIZE, (limit, limit))
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"launch.py did not end after its disk filled:\n{out[-3000:]}{err[-3000:]}")
    assert limited, f"the run ended before {appears} appeared:\n{out[-3000:]}{err[-3000:]}"
    return process.returncode, out, err, run_dir


@pytest.mark.slow
def test_a_failed_checkpoint_write_mid_run_exits_2_and_keeps_the_earlier_checkpoint(tmp_path, cli_env):
    """The driver crashed with SIGSEGV (rc -11) after the message: a view of the compiled graph's
    channel, held by the failed write's traceback, was released after Ray had shut down."""
    env = {key: value for key, value in cli_env.items() if key != "RAY_AUTH_MODE"}  # Ray's default, as users run
    rc, out, err, run_dir = launch_then_fill_the_disk(
        tmp_path,
        env,
        "checkpoints/step_00000500.pt",
        30_000,  # below a checkpoint's 38 KB, above the TensorBoard events this run writes
        "--steps=3000",
        "train.checkpoint_every=500",
        "train.log_every=500",
        "train.eval_every=0",
    )
    assert rc == 2, f"rc {rc}:\n{out[-3000:]}{err[-3000:]}"
    assert "error: could not write checkpoint" in err and "disk is full" in err and "--resume latest" in err, err
    assert "Traceback" not in err, err
    assert "Token authentication" not in err, err  # the embedded Ray starts with token auth, chosen, not defaulted
    checkpoints = run_dir / "checkpoints"
    assert read_checkpoint(checkpoints / "step_00000500.pt")["step"] == 500  # the earlier one is whole
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000500.pt"]  # no temporary file left


@pytest.mark.slow
def test_a_full_disk_at_tensorboard_before_any_checkpoint_exits_2_saying_what_to_do(tmp_path, cli_env):
    rc, out, err, run_dir = launch_then_fill_the_disk(
        tmp_path,
        cli_env,
        "events.out.tfevents.*",
        12_000,
        "--steps=3000",
        "train.checkpoint_every=0",
        "train.log_every=1",
        "train.eval_every=0",
    )
    assert rc == 2, f"rc {rc}:\n{out[-3000:]}{err[-3000:]}"
    assert f"error: could not write TensorBoard events to {run_dir}" in err and "Free space" in err, err
    assert "has no checkpoint yet" in err and "start it again" in err, err
    assert "Traceback" not in err, err
    assert not list((run_dir / "checkpoints").iterdir())
