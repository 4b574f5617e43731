"""launch.py and the distmeta command as a user runs them: subprocesses on an embedded local Ray."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distmeta.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def run(args, env, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def scalars(run_dir, tag):
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


@pytest.mark.slow
def test_launch_trains_evaluates_and_the_loss_falls(tmp_path, cli_env):
    out = run(
        [
            "launch.py",
            "--steps",
            "1200",
            "--logdir",
            str(tmp_path),
            "run_name=e2e",
            "train.log_every=100",
            "train.eval_every=600",
            "train.print_every_s=1",
            "eval.num_tasks=200",
        ],
        cli_env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 1200/1200" in out.stdout and "tasks/s" in out.stdout and "ETA" in out.stdout
    assert "evaluated 100/200 tasks" in out.stdout and "evaluated 200/200 tasks" in out.stdout  # progress
    run_dir = tmp_path / "e2e"
    loss = scalars(run_dir, "train/loss_after")
    assert sorted(loss) == list(range(100, 1201, 100))
    assert loss[1200] < 0.6 * loss[100], loss  # meta-learning happened
    assert set(scalars(run_dir, "val/mse_shots10_steps1")) == {600, 1200}
    test_mse = scalars(run_dir, "test/mse_shots10_steps10")[1200]
    assert test_mse < scalars(run_dir, "test/mse_shots10_steps1")[1200]  # more adaptation steps help
    checkpoint = run_dir / "checkpoints" / "final.pt"
    assert read_checkpoint(checkpoint)["step"] == 1200

    # evaluation from the checkpoint alone, two ways, same held-out tasks -> same numbers as training's
    evaluated = run(["launch.py", "--eval-only", "--checkpoint", str(checkpoint), "eval.num_tasks=200"], cli_env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    row = next(line.split() for line in evaluated.stdout.splitlines() if line.split()[:3] == ["10", "10", "mse"])
    assert float(row[3]) == pytest.approx(test_mse, rel=1e-4)
    assert scalars(run_dir, "eval_only_test/mse_shots10_steps10")[1200] == pytest.approx(test_mse, rel=1e-4)
    command = run(
        ["-m", "distmeta", "evaluate", "--checkpoint", str(checkpoint), "--split", "val", "eval.num_tasks=50"], cli_env
    )
    assert command.returncode == 0 and "50" in command.stdout, command.stderr[-3000:]

    # exported as zoo/ holds them: parameters and config alone, the same scores, no events beside it
    exported = tmp_path / "zoo" / "sinusoid_maml.pt"
    export = run(["-m", "distmeta", "checkpoint", "export", str(checkpoint), "--out", str(exported)], cli_env)
    assert export.returncode == 0 and "sha256" in export.stdout, export.stderr[-3000:]
    small = read_checkpoint(exported)
    assert sorted(small) == ["code_version", "config", "distmeta_version", "params", "step", "trained_by"]
    assert small["trained_by"] == read_checkpoint(checkpoint)["code_version"]  # the export says who trained it
    assert exported.stat().st_size < checkpoint.stat().st_size / 2  # no optimizer state, no task stream
    again = run(["launch.py", "--eval-only", "--checkpoint", str(exported), "eval.num_tasks=200"], cli_env)
    assert again.returncode == 0 and row in [line.split() for line in again.stdout.splitlines()], again.stdout
    assert sorted(p.name for p in exported.parent.iterdir()) == ["sinusoid_maml.pt"]
    refused = run(["-m", "distmeta", "checkpoint", "export", str(checkpoint), "--out", str(exported)], cli_env)
    assert refused.returncode == 2 and "exists: export to a new name" in refused.stderr


def test_a_metric_learner_keeps_its_best_checkpoint_and_evaluates_under_a_printed_protocol(tmp_path, cli_env):
    images = ["task.source=synthetic", "model.name=conv4", "model.filters=8", "task.image_size=16"]
    out = run(
        [
            "launch.py",
            "--steps",
            "40",
            "--logdir",
            str(tmp_path),
            "run_name=proto",
            *images,
            *("task.ways=10", "task.shots=1", "task.queries=3", "train.meta_batch_size=2"),
            *("algorithm.name=protonet", "train.eval_every=10", "train.eval_tasks=20"),
            *("eval.num_tasks=40", "eval.ways=5", "eval.queries=3"),  # trains 10-way, tests 5-way
        ],
        cli_env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| loss " in out.stdout and "->" not in out.stdout.split("protocol:")[0]  # no inner loop: one loss
    run_dir = tmp_path / "proto"
    validation = scalars(run_dir, "val/accuracy_5way_shots1_steps0")
    assert sorted(validation) == [10, 20, 30, 40]
    best = read_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert best["step"] == max(validation, key=validation.get)  # accuracy: higher is better
    assert best["validation"]["mean"] == pytest.approx(max(validation.values()), rel=1e-6)
    # how its images were made, for `distmeta adapt` (tests/test_adapt.py)
    assert best["config"]["task"]["image_format"] == {"channels": 1, "height": 16, "width": 16, "invert": False}
    assert "protocol: 40 test episodes (seed 1234), 5-way, shots [1], 3 queries per class" in out.stdout
    # learners without an inner loop cannot be asked for inner steps
    refused = run(
        [*["-m", "distmeta", "evaluate", "--checkpoint", str(run_dir / "checkpoints" / "final.pt")], "--steps", "1"],
        cli_env,
    )
    assert refused.returncode == 2 and "has no inner loop" in refused.stderr

    args = ["-m", "distmeta", "evaluate", "--checkpoint", str(run_dir / "checkpoints" / "best.pt")]
    args += ["--ways", "3", "--shots", "1", "2", "--queries", "2", "--episodes", "30", "--seed", "7"]
    first, again = run([*args, "--no-transductive"], cli_env), run([*args, "--no-transductive"], cli_env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (
        "protocol: 30 test episodes (seed 7), 3-way, shots [1, 2], 2 queries per class, "
        "batch statistics of the support set plus one query (non-transductive)"
    ) in first.stdout
    rows = [line for line in first.stdout.splitlines() if line.split()[2:3] == ["accuracy"]]
    assert [r.split()[:2] for r in rows] == [["1", "0"], ["2", "0"]] and rows[0].split()[-1] == "30"
    assert first.stdout == again.stdout  # the checkpoint and the seed pin the numbers exactly
    assert "evaluated 60/60 tasks" in first.stderr and "tasks/s | ETA" in first.stderr  # progress, on stderr
    transductive = run(args, cli_env)
    assert "over each episode's support and query sets (transductive)" in transductive.stdout
    assert transductive.stdout != first.stdout
    # each protocol writes its own TensorBoard tags: two never mix at the same step
    prefixes = [
        next(line.split()[1] for line in r.stderr.splitlines() if line.startswith("TensorBoard: "))
        for r in (first, transductive)
    ]
    assert prefixes[0] != prefixes[1] and all(p.startswith("eval_only_test_") for p in prefixes), prefixes
    for prefix, out in zip(prefixes, (first, transductive)):
        scored = next(line.split() for line in out.stdout.splitlines() if line.split()[:3] == ["1", "0", "accuracy"])
        logged = scalars(run_dir, prefix.removesuffix("/...") + "/accuracy_3way_shots1_steps0")
        assert logged == {best["step"]: pytest.approx(float(scored[3]), abs=1e-4)}
    # best.pt holds the parameters that scored its validation number: re-scoring them reproduces it
    rescored = run([*args[:5], "--split", "val", "--episodes", "20"], cli_env)
    row = next(line.split() for line in rescored.stdout.splitlines() if line.split()[2:3] == ["accuracy"])
    assert float(row[3]) == pytest.approx(best["validation"]["mean"], abs=1e-4)


@pytest.mark.slow
def test_tensorboard_flag_serves_the_scalars_over_http(tmp_path, cli_env):
    process = subprocess.Popen(
        [
            sys.executable,
            "launch.py",
            "--tensorboard",
            "--steps",
            "200",
            "--logdir",
            str(tmp_path),
            "run_name=tb",
            "train.log_every=50",
            "train.eval_every=0",
            "eval.num_tasks=20",
        ],
        cwd=ROOT,
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = _Lines(process.stdout)
    try:
        # The run's own word that it is done (its event file closed), never a deadline alone: the
        # event files are read only after it. TensorBoard's data server logs every 5 s whatever the
        # run does, so a deadline checked per output line once let a run that had not reached step
        # 50 in 240 s through to the event files, to fail with a KeyError instead of its output.
        finished = output.wait_for("still serving", process, timeout=240)
        assert finished, "launch.py did not finish its 200 steps and keep serving TensorBoard:\n" + output.tail()
        url = next(line.split()[2] for line in output.lines if line.startswith("TensorBoard at "))
        assert not [line for line in output.lines if "rustboard" in line], "TensorBoard's data server logs its loads"
        expected = scalars(tmp_path / "tb", "train/loss_after")
        query = f"{url.rstrip('/')}/data/plugin/scalars/scalars?run=tb&tag=train/loss_after"
        served = {}
        for _ in range(60):  # TensorBoard loads event files in the background: 404 until it has the run
            try:
                with urllib.request.urlopen(query, timeout=10) as response:
                    served = {step: value for _, step, value in json.load(response)}
            except urllib.error.HTTPError as err:
                assert err.code == 404, err
            if set(served) == set(expected):
                break
            time.sleep(1)
        assert sorted(served) == [50, 100, 150, 200]
        assert served == pytest.approx(expected, rel=1e-6)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # say what it was doing (its output is piped here)
            process.kill()
            pytest.fail(f"launch.py did not exit 30 s after Ctrl-C; its output:\n{output.tail()}")


class _Lines:
    """A subprocess's output, read as it comes by a thread of its own, so that waiting for a line
    has a deadline even while the process prints nothing."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._new, self._ended = threading.Condition(), threading.Event()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._new:
                self.lines.append(line)
                self._new.notify_all()
        self._ended.set()

    def wait_for(self, text: str, process: subprocess.Popen, timeout: float) -> bool:
        """Whether a line holding ``text`` came within ``timeout`` s, the process still running."""
        deadline = time.time() + timeout
        with self._new:
            while not any(text in line for line in self.lines):
                if process.poll() is not None or time.time() > deadline:
                    return False
                self._new.wait(timeout=1)
        return process.poll() is None

    def tail(self, count: int = 60) -> str:
        self._ended.wait(timeout=5)  # a process that has ended: its last lines, which say why
        return "".join(self.lines[-count:])


@pytest.mark.parametrize(
    "args, message",
    [
        (["algorithm.inner_lrr=0.1"], "did you mean algorithm.inner_lr"),
        (["--config", "configs/nope.yaml"], "configs/nope.yaml does not exist"),
        (["--num-workers", "0"], "cluster.num_workers must be auto or a number >= 1, got 0"),
        (["--address", "127.0.0.1:9"], "nothing answers at '127.0.0.1:9'"),
        (["--eval-only"], "launch.py --eval-only: error: the following arguments are required: --checkpoint"),
        (["--eval-only", "--checkpoint", "missing.pt"], "checkpoint missing.pt does not exist"),
        # the value of a one-value flag is its value, whatever it looks like
        (["--eval-only", "--checkpoint", "run_name=x.pt"], "checkpoint run_name=x.pt does not exist"),
        # a setting after --resume is a setting, not the run to resume
        (["--resume", "train.steps=40000", "--logdir", "/nowhere"], "--resume latest: no run under /nowhere"),
    ],
)
def test_bad_input_exits_2_with_the_reason(args, message, cli_env):
    started = time.time()
    out = run(["launch.py", *args], cli_env, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr
    assert time.time() - started < 60  # nothing waits on a bad input


def test_an_embedded_ray_that_does_not_start_in_time_is_named_with_its_setting(tmp_path, cli_env):
    # Ray's own wait for its GCS, cut to nothing: the user's value is kept (distmeta's default is 120 s)
    env = dict(cli_env, RAY_gcs_server_port_wait_time_s="0")
    out = run(["launch.py", "--steps", "2", "--logdir", str(tmp_path)], env, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "the embedded local Ray did not start" in out.stderr
    assert "RAY_gcs_server_port_wait_time_s=0 s allowed" in out.stderr
    assert not list(tmp_path.iterdir())  # nothing was written, so the run folder it created is gone too


def test_a_corrupt_checkpoint_is_named(tmp_path, cli_env):
    bad = tmp_path / "final.pt"
    bad.write_bytes(b"not a checkpoint")
    out = run(["launch.py", "--eval-only", "--checkpoint", str(bad)], cli_env)
    assert out.returncode == 2 and f"checkpoint {bad} cannot be read" in out.stderr


def _untrained_checkpoint(run_dir: Path) -> Path:
    """A sinusoid run's checkpoint at step 0, written as training writes one (no Ray needed)."""
    from distmeta.algorithms import initial_parameters
    from distmeta.checkpoint import CheckpointStore
    from distmeta.config import load_config
    from distmeta.tasks import build_source

    cfg = load_config(None, ["eval.num_tasks=20", "eval.inner_steps=[1]", f"run_name={run_dir.name}"])
    params = torch.from_numpy(initial_parameters(cfg, build_source(cfg.task)))
    state = {"params": params, "step": 0, "config": cfg.to_dict()}
    return Path(CheckpointStore(run_dir / "checkpoints").write("final.pt", state))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when there is no CUDA GPU")
def test_evaluate_on_cuda_without_cuda_exits_2_with_the_reason(tmp_path, capsys):
    from distmeta.cli import main

    checkpoint = _untrained_checkpoint(tmp_path / "run")
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda cannot be used: torch" in err and "sees no CUDA GPU" in err and "use --device cpu" in err


@pytest.fixture
def read_only_run(tmp_path):
    """A run folder on a read-only mount (a bind mount: root, as the tests run here, writes through
    any chmod; a read-only mount stops it too)."""
    run_dir = tmp_path / "run"
    checkpoint = _untrained_checkpoint(run_dir)
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(run_dir), str(run_dir)], capture_output=True)
    if mounted.returncode != 0:
        if os.geteuid() == 0:
            pytest.skip(f"cannot make a read-only mount here: {mounted.stderr.decode().strip()}")
        run_dir.chmod(0o555)  # not root: permissions are enough
    try:
        yield run_dir, checkpoint
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", str(run_dir)], check=True)
        run_dir.chmod(0o755)


def test_evaluate_reads_a_checkpoint_in_a_read_only_folder_and_says_what_it_did_not_write(read_only_run, capsys):
    from distmeta.cli import main

    run_dir, checkpoint = read_only_run
    before = sorted(p.name for p in run_dir.iterdir())
    assert main(["evaluate", "--checkpoint", str(checkpoint)]) == 0
    out = capsys.readouterr()
    assert "mse" in out.out and out.out.splitlines()[-1].split()[-1] == "20"  # the results, for all 20 tasks
    assert f"note: {run_dir} is not writable (" in out.err and "no eval_only_test TensorBoard events" in out.err
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_the_readmes_training_from_python_runs_as_written(ray_local, tmp_path, monkeypatch, capsys):
    """README, "Training from Python": its block, run as a user's script from a checkout's folder."""
    section = (ROOT / "README.md").read_text().split("### Training from Python\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    final = tmp_path / "runs" / "maml_from_python" / "checkpoints" / "final.pt"
    (scores,) = [
        line
        for line in printed
        if line.startswith(f"{final} [(1, ") or line.startswith(f"{final.relative_to(tmp_path)} [(1, ")
    ]
    assert final.is_file() and "(10, " in scores  # the test rows after 1 / 5 / 10 steps
    assert "loss_after" in printed[-1]
