"""A run folder belongs to one run at a time: a second run (fresh or resumed) into a folder that a
live process holds is refused at once, naming the holder; the lock goes when the holder dies; a run
that wrote nothing leaves no folder; and default run names never collide."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_runtime import small

from distmeta.checkpoint import CheckpointStore, step_name
from distmeta.config import ConfigError
from distmeta.resume import prepare_resume
from distmeta.run import run_name
from distmeta.runfolder import LOCK_FILE, claim, release
from distmeta.train import train

ROOT = Path(__file__).resolve().parent.parent
HOLD = (
    "import sys; from pathlib import Path; from distmeta.runfolder import claim; "
    "claim(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()"
)


def _hold(run_dir: Path, cli_env) -> subprocess.Popen:
    """Another process that claims ``run_dir`` (as a running launch.py claims it) until killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)],
        cwd=ROOT,
        env=cli_env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "held\n"
    return holder


@pytest.fixture
def held(tmp_path, cli_env):
    """tmp_path/shared, claimed by another process until killed."""
    run_dir = tmp_path / "shared"
    holder = _hold(run_dir, cli_env)
    yield run_dir, holder
    holder.kill()
    holder.wait(timeout=30)


def _checkpoints(run_dir: Path, cfg, steps):
    """Checkpoints with the entries a resume needs (no Ray: the refusal comes before any actor)."""
    store = CheckpointStore(run_dir / "checkpoints")
    for step in steps:
        state = {"params": torch.zeros(3), "step": step, "config": cfg.to_dict(), "optimizer": {}}
        store.write(step_name(step), state)
    return store


def test_a_run_folder_held_by_another_process_is_refused_at_once(held, tmp_path, cli_env):
    run_dir, holder = held
    started = time.time()
    out = subprocess.run(
        [sys.executable, "launch.py", "--logdir", str(tmp_path), "run_name=shared", "--steps", "10"],
        cwd=ROOT,
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"run folder {run_dir} is in use by another run (pid {holder.pid} on " in out.stderr
    assert time.time() - started < 60 and "placement" not in out.stdout  # refused before Ray started
    with pytest.raises(ConfigError, match=f"in use by another run \\(pid {holder.pid} "):
        train(small(f"logdir={tmp_path}"), run_dir)


def test_a_resume_into_a_held_folder_moves_nothing_and_a_killed_holder_frees_it(held, tmp_path):
    run_dir, holder = held
    cfg = small("train.steps=40", f"logdir={tmp_path}", "run_name=shared")
    store = _checkpoints(run_dir, cfg, [10, 20])
    with pytest.raises(ConfigError, match="in use by another run"):
        prepare_resume(store.uri(step_name(10)), [], {})
    assert [step for step, _ in store.step_files()] == [10, 20]  # step 20 was not moved aside
    assert not list(run_dir.glob("checkpoints/set-aside-*"))

    holder.send_signal(signal.SIGKILL)  # a crash: the OS drops its lock, nothing is left to clean up
    holder.wait(timeout=30)
    try:
        cfg, resumed = prepare_resume(store.uri(step_name(10)), [], {})
        assert resumed == run_dir and [step for step, _ in store.step_files()] == [10]
    finally:
        release(run_dir)


def test_a_run_that_wrote_nothing_leaves_no_folder_and_frees_it_for_the_next(tmp_path, cli_env):
    fresh, kept, existing = tmp_path / "fresh", tmp_path / "kept", tmp_path / "existing"
    claim(fresh)
    (fresh / "checkpoints").mkdir()  # as a run makes it before Ray starts
    release(fresh)
    assert not fresh.exists()

    claim(kept)
    (kept / "checkpoints").mkdir()
    (kept / "checkpoints" / "step_00000001.pt").write_bytes(b"a step")
    release(kept)
    assert sorted(p.name for p in kept.rglob("*")) == sorted([LOCK_FILE, "checkpoints", "step_00000001.pt"])

    existing.mkdir()  # the user's folder, say: only a folder a claim created is removed
    claim(existing)
    release(existing)
    assert sorted(p.name for p in existing.iterdir()) == [LOCK_FILE]

    holder = _hold(fresh, cli_env)  # the removed folder's path: a new folder and lock, held as any other
    try:
        with pytest.raises(ConfigError, match=f"in use by another run \\(pid {holder.pid} "):
            claim(fresh)
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_default_run_names_of_the_same_second_differ():
    cfg = small()
    names = [run_name(cfg) for _ in range(200)]
    stamps = {re.sub(r"-[0-9a-f]{6}$", "", name) for name in names}
    assert len(stamps) <= 2 and len(set(names)) == 200, names[:3]  # one or two seconds, 200 folders
    assert all(re.fullmatch(r"maml-sinusoid-\d{8}-\d{6}-[0-9a-f]{6}", name) for name in names)


def test_two_launches_with_default_names_in_one_second_get_their_own_folders(tmp_path, cli_env):
    """Two processes started together (a backgrounded sweep), each naming its run: different
    folders, each claimed by its own process."""
    code = (
        "import sys, time; from pathlib import Path; from distmeta.config import load_config; "
        "from distmeta.runfolder import claim; from distmeta.run import run_name; "
        "cfg = load_config(None, [f'logdir={sys.argv[1]}']); time.sleep(max(0, float(sys.argv[2]) - time.time())); "
        "run_dir = Path(cfg.logdir) / run_name(cfg); claim(run_dir); print(run_dir, flush=True); sys.stdin.read()"
    )
    at = int(time.time()) + 8.5  # both have imported torch by then; mid-second, so both name in one second
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path), str(at)],
            cwd=ROOT,
            env=cli_env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        folders = [p.stdout.readline().strip() for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)
    assert all(folders) and folders[0] != folders[1], [p.stderr.read() for p in procs]
    assert folders[0].rsplit("-", 1)[0] == folders[1].rsplit("-", 1)[0]  # the same second
    assert sorted(os.listdir(tmp_path)) == sorted(Path(f).name for f in folders)
