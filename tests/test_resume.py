"""Exact resume: a run stopped by a signal (or picked up from any of its checkpoints) and resumed
ends with bit-identical parameters to the same run left alone, and its TensorBoard logs hold every
step once."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_faults import MODELS
from test_runtime import saved_params, small
from torch.utils.tensorboard import SummaryWriter

from distmeta.algorithms import initial_parameters
from distmeta.checkpoint import CheckpointStore, checkpoint_location, read_checkpoint, step_name
from distmeta.config import ConfigError, load_config
from distmeta.report import EvalRow
from distmeta.resume import prepare_resume
from distmeta.runfolder import release
from distmeta.runtime.monitor import validation_logged, write_eval_scalars
from distmeta.tasks import build_source
from distmeta.train import train

ROOT = Path(__file__).resolve().parent.parent
RUN = [
    "train.steps=400",
    "train.meta_batch_size=7",
    "train.dtype=float64",
    "train.log_every=10",
    "train.eval_every=100",
    "train.eval_tasks=10",
    "train.checkpoint_every=50",
    "eval.num_tasks=20",
    "eval.inner_steps=[1]",
    "algorithm.implementation=vmap",
]


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def launch(args, env, **kwargs):
    return subprocess.Popen(
        [sys.executable, "launch.py", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cli_env) -> Path:
    """The run left alone (once for both signals): the folder of its run."""
    logdir = tmp_path_factory.mktemp("straight")
    run = launch(["--logdir", str(logdir), "run_name=straight", *RUN], cli_env)
    assert run.wait(timeout=300) == 0, run.stdout.read()[-3000:]
    return logdir / "straight"


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_a_run_stopped_by_a_signal_and_resumed_ends_bit_identical(tmp_path, cli_env, how, straight):

    # Ctrl-C in a terminal signals the whole foreground process group, Ray's own processes included
    stopped = launch(["--logdir", str(tmp_path), "run_name=stopped", *RUN], cli_env, start_new_session=True)
    first = tmp_path / "stopped" / "checkpoints" / step_name(100)
    deadline = time.time() + 240
    while not first.exists() and stopped.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if how == "SIGTERM":
        os.kill(stopped.pid, signal.SIGTERM)
    else:
        os.killpg(stopped.pid, signal.SIGINT)
    out = stopped.communicate(timeout=120)[0]
    signum = signal.SIGTERM if how == "SIGTERM" else signal.SIGINT
    assert stopped.returncode == 128 + signum, out[-3000:]
    assert "stopping at the next logging step" in out and "resume with: python launch.py --resume" in out
    at = read_checkpoint(_newest(tmp_path / "stopped"))
    assert 100 <= at["step"] < 400, "stopped too late to test anything"
    assert not (tmp_path / "stopped" / "checkpoints" / "final.pt").exists()

    resumed = launch(["--resume", str(tmp_path / "stopped")], cli_env)
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert f"resuming at step {at['step']} from" in out

    runs = {"straight": straight, "stopped": tmp_path / "stopped"}
    final = {name: read_checkpoint(run / "checkpoints" / "final.pt") for name, run in runs.items()}
    assert np.array_equal(final["stopped"]["params"].numpy(), final["straight"]["params"].numpy())
    adam = [final[name]["optimizer"]["state"][0] for name in ("straight", "stopped")]
    assert all(np.array_equal(adam[0][k].numpy(), adam[1][k].numpy()) for k in ("exp_avg", "exp_avg_sq", "step"))
    for tag in ("train/loss_after", "val/mse_shots10_steps1", "test/mse_shots10_steps1"):
        assert scalars(runs["stopped"], tag) == scalars(straight, tag), tag  # each step once


def test_a_killed_driver_takes_its_embedded_ray_along_and_resume_latest_ends_bit_identical(tmp_path, cli_env, straight):
    """SIGKILL to the driver alone (the OOM killer, kill -9): no handler runs, so nothing is saved
    past the last checkpoint. The embedded Ray it started must not outlive it, holding memory and
    cores, and `--resume latest` must end where the run left alone ends, each logged step once:
    killed as the checkpoint at step 200 appears, the validation of step 200 (in the background)
    is rarely on disk, and the resumed run must then repeat it."""
    killed = launch(["--logdir", str(tmp_path), "run_name=killed", *RUN], cli_env)
    checkpoint = tmp_path / "killed" / "checkpoints" / step_name(200)
    deadline = time.time() + 240
    while not checkpoint.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    ray_processes = psutil.Process(killed.pid).children(recursive=True)  # its raylet, GCS, workers...
    killed.kill()
    assert killed.wait(timeout=30) == -signal.SIGKILL, killed.stdout.read()[-3000:]
    # not Ray's dashboard and runtime-env agents: they notice their raylet is gone a minute later
    agents = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
    _, alive = psutil.wait_procs([p for p in ray_processes if p.name() not in agents], timeout=30)
    assert not alive, f"the killed driver's embedded Ray is still running: {[p.cmdline()[:1] for p in alive]}"
    assert read_checkpoint(_newest(tmp_path / "killed"))["step"] == 200
    on_disk = any(step == 200 for step, _ in scalars(tmp_path / "killed", "val/mse_shots10_steps1"))

    resumed = launch(["--resume", "latest", "--logdir", str(tmp_path)], cli_env)
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert "resuming at step 200 from" in out
    assert ("validating step 200 again" in out) == (not on_disk), out[-3000:]
    final = [read_checkpoint(run / "checkpoints" / "final.pt") for run in (straight, tmp_path / "killed")]
    assert np.array_equal(final[0]["params"].numpy(), final[1]["params"].numpy())
    for tag in ("train/loss_after", "val/mse_shots10_steps1", "test/mse_shots10_steps1"):
        assert scalars(tmp_path / "killed", tag) == scalars(straight, tag), tag  # each step once, none lost


def test_a_validation_counts_as_logged_only_whole(tmp_path):
    """The writer appends each scalar as it goes: a run killed while logging a validation leaves
    part of it on disk, and its resume must repeat it."""
    rows = [
        EvalRow(ways=5, shots=1, steps=k, metric="accuracy", mean=0.5, ci95=0.1, median=0.5, diverged=0, tasks=10)
        for k in (1, 3)
    ]
    writer = SummaryWriter(str(tmp_path))
    write_eval_scalars(writer, 100, "val", rows)  # a whole one at step 100
    for tag in ("val/accuracy_5way_shots1_steps1", "val/accuracy_5way_shots1_steps1_ci95"):
        writer.add_scalar(tag, 0.5, 200)  # the first two of eight scalars at step 200
    writer.close()
    assert validation_logged(tmp_path, 100, rows=2)
    assert not validation_logged(tmp_path, 200, rows=2)
    assert not validation_logged(tmp_path, 300, rows=2)


def test_a_stop_in_the_last_logging_window_still_writes_final_pt(tmp_path, cli_env):
    """After the checkpoint at step 250 (which ends a logging window) the next logging step is the
    last: a SIGTERM there lets training finish, so final.pt is written and the command says how to
    test it (only the test evaluation is skipped)."""
    run = [*RUN, "train.steps=300", "train.log_every=300", "train.checkpoint_every=250", "train.eval_every=0"]
    stopped = launch(["--logdir", str(tmp_path), "run_name=late", *run], cli_env)
    first = tmp_path / "late" / "checkpoints" / step_name(250)
    deadline = time.time() + 240
    while not first.exists() and stopped.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    stopped.send_signal(signal.SIGTERM)
    out = stopped.communicate(timeout=120)[0]
    assert stopped.returncode == 128 + signal.SIGTERM, out[-3000:]
    final = tmp_path / "late" / "checkpoints" / "final.pt"
    assert "SIGTERM: training finished, the test evaluation skipped at step 300" in out
    assert f"test with: distmeta evaluate --checkpoint {final}" in out and "resume with" not in out
    assert read_checkpoint(final)["step"] == 300


def _newest(run_dir: Path) -> Path:
    return max((run_dir / "checkpoints").glob("step_*.pt"))


@pytest.mark.parametrize("model", MODELS)
def test_resume_latest_skips_a_corrupted_checkpoint_and_sets_newer_ones_aside(ray_local, tmp_path, capsys, model):
    run = [*MODELS[model], "train.steps=60", "train.checkpoint_every=10", "train.checkpoint_keep=0"]
    cfg = small(*run, f"logdir={tmp_path}")
    expected = saved_params(train(cfg, tmp_path / "a"))
    shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints")
    folder = tmp_path / "b" / "checkpoints"
    for name in ("final.pt", "best.pt", step_name(60), step_name(50)):
        (folder / name).unlink(missing_ok=True)
    (folder / step_name(40)).write_bytes((folder / step_name(40)).read_bytes()[:1000])  # a torn write

    cfg, run_dir = prepare_resume("latest", [f"logdir={tmp_path}", "run_name=b"], {})
    assert run_dir == tmp_path / "b" and "resuming with changed settings: run_name='b'" in capsys.readouterr().out
    result = train(cfg, run_dir, resume=True)
    assert "resuming at step 30" in capsys.readouterr().out
    assert np.array_equal(saved_params(result), expected)
    aside = list(folder.glob("set-aside-*/" + step_name(40)))
    assert len(aside) == 1  # the torn checkpoint was moved aside, not deleted


def test_checkpoints_in_an_object_store_resume_bit_identical(ray_local, s3_server, tmp_path, capsys):
    """train.checkpoint_dir on a real S3 API: the driver writes the checkpoints there, the parameter
    server actor restores from there, and resume finds a run's newest valid one there."""
    where = [f"logdir={tmp_path}", f"train.checkpoint_dir={s3_server('checkpoints')}"]
    cfg = small("train.steps=60", "train.checkpoint_every=10", "train.checkpoint_keep=0", *where)
    expected = saved_params(train(cfg, tmp_path / "a"))
    store = CheckpointStore(checkpoint_location(cfg, tmp_path / "a"))
    assert [step for step, _ in store.step_files()] == [10, 20, 30, 40, 50, 60]
    assert not (tmp_path / "a" / "checkpoints").exists()
    for name in ("final.pt", step_name(60), step_name(50)):  # as if stopped after step 40...
        store.fs.delete_file(store.path(name))
    with store.fs.open_output_stream(store.path(step_name(40))) as f:
        f.write(b"torn")  # ...in the middle of writing it

    cfg, run_dir = prepare_resume("latest", where, {})  # the newest run, found by its checkpoints in S3
    assert run_dir == tmp_path / "a"
    result = train(cfg, run_dir, resume=True)
    assert "resuming at step 30" in capsys.readouterr().out
    assert np.array_equal(saved_params(result), expected)

    cfg, run_dir = prepare_resume(store.uri(step_name(20)), where, {})  # a checkpoint named by its URI
    assert run_dir == tmp_path / "a" and [step for step, _ in store.step_files()] == [10, 20]
    assert np.array_equal(saved_params(train(cfg, run_dir, resume=True)), expected)


def test_resume_from_an_earlier_checkpoint_and_on_another_number_of_workers(ray_local, tmp_path):
    cfg = small("train.steps=40", "train.checkpoint_every=10", "train.checkpoint_keep=0")
    expected = saved_params(train(cfg, tmp_path / "a"))
    cfg, run_dir = prepare_resume(str(tmp_path / "a" / "checkpoints" / step_name(20)), ["cluster.num_workers=3"], {})
    assert run_dir == tmp_path / "a" and cfg.cluster.num_workers == 3
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("set-aside-*/*")) == [
        "final.pt",  # the run goes on past it
        step_name(30),
        step_name(40),
    ]
    result = train(cfg, run_dir, resume=True)
    # the same tasks every step, only summed in other groups: equal up to rounding
    np.testing.assert_allclose(saved_params(result), expected, rtol=1e-10, atol=1e-12)


def test_checkpoints_record_the_implementation_auto_chose(ray_local, tmp_path):
    """A resumed run computes with it rather than timing again (another choice rounds differently);
    a resume on other hardware may ask for auto again."""
    cfg = small("train.steps=4", "train.checkpoint_every=2", "algorithm.implementation=auto")
    train(cfg, tmp_path / "a")
    assert cfg.algorithm.implementation == "auto"  # the run's copy records the choice, not the caller's config
    for name in (step_name(2), "final.pt"):
        chosen = read_checkpoint(tmp_path / "a" / "checkpoints" / name)["config"]["algorithm"]["implementation"]
        assert chosen in ("vmap", "loop", "batched", "threads")
    cfg, run_dir = prepare_resume(str(tmp_path / "a"), ["train.steps=6"], {})
    release(run_dir)
    assert cfg.algorithm.implementation == chosen  # resumed: computes as the run did
    cfg, run_dir = prepare_resume(str(tmp_path / "a"), ["train.steps=6", "algorithm.implementation=auto"], {})
    release(run_dir)
    assert cfg.algorithm.implementation == "auto"


def test_resume_refuses_what_it_cannot_do_exactly(ray_local, tmp_path):
    cfg = small("train.steps=20", "train.checkpoint_every=10", "meta_optimizer.final_lr=0.0001")
    train(cfg, tmp_path / "a")
    with pytest.raises(ConfigError, match="cannot change algorithm.inner_lr"):
        prepare_resume(str(tmp_path / "a"), ["algorithm.inner_lr=0.5"], {})
    with pytest.raises(ConfigError, match="anneals its learning rate linearly over train.steps=20"):
        prepare_resume(str(tmp_path / "a"), ["train.steps=30"], {})  # every later step's rate would change
    with pytest.raises(ConfigError, match="at step 20, and the run ends at train.steps=20: train further in a new"):
        prepare_resume(str(tmp_path / "a"), [], {})  # not "pass train.steps=N", which the schedule forbids
    with pytest.raises(ConfigError, match="already has checkpoints .* --resume"):
        train(cfg, tmp_path / "a")
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)  # a run that died after a validation, before a checkpoint
    shutil.copy(tmp_path / "a" / "checkpoints" / "final.pt", tmp_path / "b" / "checkpoints" / "best.pt")
    with pytest.raises(ConfigError, match="already holds best.pt of an earlier run .* another run_name"):
        train(cfg, tmp_path / "b")
    with pytest.raises(ConfigError, match="no run under .* has a checkpoint"):
        prepare_resume("latest", [f"logdir={tmp_path / 'empty'}"], {})
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match="cannot write the run's logs"):
        train(cfg, tmp_path / "a-file" / "run")


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    """A finished 20-step run (checkpoints at 10 and 20, final.pt, best.pt) to copy from."""
    cfg = small("train.steps=20", "train.checkpoint_every=10", "train.checkpoint_keep=0")
    cfg = load_config(None, ["train.eval_every=10", "train.eval_tasks=10"], base=cfg.to_dict())
    return train(cfg, tmp_path_factory.mktemp("trained") / "a").run_dir


def _copy_run(run_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(run_dir, tmp_path / run_dir.name)
    return tmp_path / run_dir.name


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_from_a_file_outside_checkpoints_goes_to_the_run_name_given(trained, tmp_path):
    run_dir = _copy_run(trained, tmp_path)
    before = _contents(run_dir / "checkpoints")
    (tmp_path / "elsewhere").mkdir()
    copied = shutil.copy(run_dir / "checkpoints" / step_name(10), tmp_path / "elsewhere" / "x.pt")

    cfg, resumed = prepare_resume(str(copied), [f"logdir={tmp_path}", "run_name=b"], {})
    assert resumed == tmp_path / "b" and cfg.run_name == "b"
    assert _contents(run_dir / "checkpoints") == before  # run a is left as it was
    result = train(cfg, resumed, resume=True)
    assert result.run_dir == tmp_path / "b" and read_checkpoint(result.checkpoint)["config"]["run_name"] == "b"
    np.testing.assert_array_equal(saved_params(result), read_checkpoint(run_dir / "checkpoints" / "final.pt")["params"])
    assert _contents(run_dir / "checkpoints") == before
    with pytest.raises(ConfigError, match="run_name=b: run .* already has checkpoints"):
        prepare_resume(str(copied), [f"logdir={tmp_path}", "run_name=b"], {})  # b is a run now


def test_best_pt_cannot_resume_and_nothing_is_touched(trained, tmp_path):
    run_dir = _copy_run(trained, tmp_path)
    best = run_dir / "checkpoints" / "best.pt"
    assert read_checkpoint(best)["step"] in (10, 20)  # the step of a real checkpoint: the one it overwrote
    before = _contents(run_dir)
    with pytest.raises(ConfigError, match=f"parameters only .* train.init_from={best}"):
        prepare_resume(str(best), ["train.steps=40"], {})
    assert _contents(run_dir) == before


def test_final_pt_resumes_and_a_resume_never_overwrites_a_step_file(trained, tmp_path):
    run_dir = _copy_run(trained, tmp_path)
    folder = run_dir / "checkpoints"
    own_20 = (folder / step_name(20)).read_bytes()
    best_step = read_checkpoint(folder / "best.pt")["step"]
    _, resumed = prepare_resume(str(folder / "final.pt"), ["train.steps=30"], {})
    release(resumed)
    assert [p.read_bytes() for p in folder.glob(f"set-aside-*/{step_name(20)}")] == [own_20]
    assert not (folder / "final.pt").exists() and (folder / "best.pt").exists()  # best.pt is of step 10 or 20

    store = CheckpointStore(folder)  # a step file that differs from the checkpoint resumed from
    state = read_checkpoint(folder / step_name(10))
    store.write(step_name(10), state | {"params": state["params"] + 1})
    different = (folder / step_name(10)).read_bytes()
    (tmp_path / "elsewhere").mkdir()
    copied = shutil.copy(trained / "checkpoints" / step_name(10), tmp_path / "elsewhere" / "x.pt")
    _, resumed = prepare_resume(str(copied), [f"logdir={tmp_path}"], {})  # into run a, named in the checkpoint
    release(resumed)
    assert resumed == run_dir
    assert different in [p.read_bytes() for p in folder.glob(f"set-aside-*/{step_name(10)}")]  # kept, aside
    assert (folder / "best.pt").exists() == (best_step <= 10)  # a best of step 20 is the future of step 10
    np.testing.assert_array_equal(read_checkpoint(folder / step_name(10))["params"], state["params"])


def test_init_from_starts_a_fresh_run_from_any_checkpoints_parameters(trained, tmp_path):
    best = trained / "checkpoints" / "best.pt"
    params = read_checkpoint(best)["params"].numpy()
    cfg = small("train.steps=2", f"train.init_from={best}", "meta_optimizer.lr=1e-12")
    result = train(cfg, tmp_path / "b")
    final = read_checkpoint(result.checkpoint)
    np.testing.assert_allclose(final["params"].numpy(), params, rtol=0, atol=1e-9)  # 2 steps of 1e-12
    assert np.abs(params - initial_parameters(cfg, build_source(cfg.task))).max() > 1e-3  # not the seed's init
    assert final["step"] == 2 and final["optimizer"]["state"][0]["step"].item() == 2  # a fresh Adam
    with pytest.raises(ConfigError, match="cannot change train.init_from"):
        prepare_resume(str(tmp_path / "b"), ["train.steps=4", "train.init_from="], {})
    with pytest.raises(ConfigError, match=r"holds \d+ parameters of a mlp .* has \d+"):
        train(small("model.hidden=[8]", f"train.init_from={best}"), tmp_path / "c")
