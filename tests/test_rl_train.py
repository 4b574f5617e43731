"""Meta-RL runs through the whole system on a real local Ray: launch.py's config, checkpoints,
resume, faults, TensorBoard, ``distmeta evaluate``, and bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_faults import Saboteur, processes

from distmeta.assemble import check_run
from distmeta.checkpoint import read_checkpoint
from distmeta.config import ConfigError, load_config
from distmeta.resume import prepare_resume
from distmeta.rl.distributed import RayMetaRL
from distmeta.rl.evaluate import evaluate_returns
from distmeta.rl.local import LearnerState, LocalMetaRL
from distmeta.rl.setup import MetaRLSetup
from distmeta.runtime.supervisor import ActorLost, is_fault
from distmeta.train import train

ROOT = Path(__file__).resolve().parent.parent
NAVIGATION = ROOT / "configs" / "navigation2d_maml_trpo.yaml"


# The shipped navigation config at test size, in float64. The damping: at the paper's 1e-5 conjugate
# gradient amplifies the last bits of the workers' sums (test_rl.py), so the system and one process
# are compared at 0.1.
TEST_SIZE = [
    "model.hidden=[8]",
    "train.dtype=float64",
    "train.meta_batch_size=4",
    "rl.episodes_per_task=3",
    "rl.cg_damping=0.1",
]


def small(tmp_path, *overrides, config=NAVIGATION):
    """The shipped navigation config at test size (``TEST_SIZE``), 4 steps on 2 workers."""
    return load_config(
        config,
        [
            f"logdir={tmp_path}",
            *TEST_SIZE,
            "train.steps=4",
            "train.checkpoint_every=2",
            "train.eval_every=2",
            "train.eval_tasks=3",
            "eval.num_tasks=3",
            "eval.shots=[3]",
            "cluster.num_workers=2",
            "cluster.cpus_per_worker=1",
            *overrides,
        ],
    )


def final_params(run_dir: Path) -> torch.Tensor:
    return read_checkpoint(run_dir / "checkpoints" / "final.pt")["params"]


def test_a_run_trains_as_one_process_checkpoints_logs_and_evaluates(ray_local, tmp_path):
    cfg = small(tmp_path)
    result = train(cfg, tmp_path / "run")
    reference = LocalMetaRL(MetaRLSetup.of(cfg))  # one share, no Ray
    reference.run(4)
    torch.testing.assert_close(final_params(result.run_dir), reference.theta, rtol=1e-10, atol=1e-12)
    names = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir())
    assert names == ["best.pt", "final.pt", "step_00000002.pt", "step_00000004.pt"]
    saved = read_checkpoint(result.run_dir / "checkpoints" / "step_00000002.pt")
    assert saved["step"] == 2 and saved["next_draw"] == 2 and saved["optimizer"] == {}
    # the final scores are those of the same tasks scored in this process, split differently
    theta = reference.theta.numpy()
    local_rows = evaluate_returns(reference, cfg, theta, "test", 3)
    assert [(r.steps, r.tasks, r.metric) for r in result.eval_rows] == [(k, 3, "return") for k in range(4)]
    assert [(r.steps, r.tasks) for r in local_rows] == [(k, 3) for k in range(4)]
    for got, want in zip(result.eval_rows, local_rows):
        assert got.mean == pytest.approx(want.mean, rel=1e-9)
    events = EventAccumulator(str(result.run_dir))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in (
        "return/before_adaptation",
        "return/after_adaptation",
        "episode_length/after_adaptation",
        "policy/entropy",
        "meta_step/kl",
        "meta_step/surrogate_improvement",
        "throughput/environment_steps_per_s",
        "time/rollout_s",
        "time/learn_s",
    ):
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3, 4], tag
    assert [e.step for e in events.Scalars("val/return_shots3_steps1")] == [2, 4]
    assert [e.value for e in events.Scalars("test/return_shots3_steps0")] == [pytest.approx(result.eval_rows[0].mean)]
    assert all(0 < e.value <= 0.01 + 1e-12 for e in events.Scalars("meta_step/kl"))
    assert "hparams/return_shots3_steps1" in scalars


# MAML-TRPO's resume: test_sigterm_stops_a_meta_rl_run_with_a_checkpoint_and_resume_finishes_it
@pytest.mark.parametrize("algorithm", ["promp"])
def test_a_resumed_run_ends_bit_identical_to_one_left_alone(ray_local, tmp_path, algorithm):
    straight = train(small(tmp_path, f"algorithm.name={algorithm}", "run_name=straight"), tmp_path / "straight")
    cfg = small(tmp_path, f"algorithm.name={algorithm}", "run_name=parts", "train.steps=2")
    train(cfg, tmp_path / "parts")
    resumed_cfg, run_dir = prepare_resume(str(tmp_path / "parts"), ["train.steps=4"], {})
    resumed = train(resumed_cfg, run_dir, resume=True)
    assert torch.equal(final_params(resumed.run_dir), final_params(straight.run_dir))
    optimizer = read_checkpoint(resumed.run_dir / "checkpoints" / "final.pt")["optimizer"]
    expected = read_checkpoint(straight.run_dir / "checkpoints" / "final.pt")["optimizer"]
    assert sorted(optimizer) == sorted(expected) == (["exp_avg", "exp_avg_sq", "step"] if algorithm == "promp" else [])
    for key, value in expected.items():
        assert torch.equal(optimizer[key], value), key


def test_a_resumed_meta_rl_run_counts_rejected_steps_on_from_its_earlier_part(ray_local, tmp_path):
    """Non-finite meta-steps (an inner step size that overflows float32) are rejected; their steps
    are checkpointed, so train.max_rejected_steps and TensorBoard's count go on across a resume."""
    bad = ["train.dtype=float32", "algorithm.inner_lr=1e38", "train.eval_every=0", "run_name=run"]
    train(small(tmp_path, *bad, "train.max_rejected_steps=100"), tmp_path / "run")
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "final.pt")["rejected_steps"] == [0, 1, 2, 3]
    cfg, run_dir = prepare_resume(str(tmp_path / "run"), ["train.steps=8", "train.max_rejected_steps=6"], {})
    with pytest.raises(FloatingPointError, match=r"6 meta-steps in a row came out non-finite \(the last at step 5\)"):
        train(cfg, run_dir, resume=True)  # 4 before the resume, 2 after
    events = EventAccumulator(str(run_dir))
    events.Reload()
    counted = {e.step: e.value for e in events.Scalars("faults/rejected_steps")}
    assert counted == {step: float(step) for step in range(1, 7)}  # one count, on across the resume


@pytest.mark.parametrize("role", ["ShareWorker", "MetaRLServer"])
def test_a_killed_actor_is_replaced_and_the_run_ends_as_if_nothing_happened(ray_local, tmp_path, role):
    cfg = small(tmp_path, "train.steps=6", "train.eval_every=0")
    saboteur = Saboteur(tmp_path / "run", role, [2, 4])
    saboteur.start()
    result = train(cfg, tmp_path / "run")
    assert len(saboteur.hits) == 2 and result.recoveries >= 2
    reference = LocalMetaRL(MetaRLSetup.of(cfg))
    reference.run(6)
    torch.testing.assert_close(final_params(result.run_dir), reference.theta, rtol=1e-10, atol=1e-12)
    events = EventAccumulator(str(result.run_dir))
    events.Reload()
    assert max(e.value for e in events.Scalars("faults/recovered")) == result.recoveries
    assert [e.step for e in events.Scalars("return/after_adaptation")] == list(range(1, 7))  # none twice


def test_a_run_that_allows_no_actor_restarts_stops_at_the_first_fault(ray_local, tmp_path):
    cfg = small(tmp_path, "train.steps=4", "train.eval_every=0", "cluster.actor_restarts=0")
    saboteur = Saboteur(tmp_path / "run", "ShareWorker", [2])
    saboteur.start()
    with pytest.raises(ActorLost, match=r"after 0 recoveries: cluster.actor_restarts=0 allows no more"):
        train(cfg, tmp_path / "run")
    assert saboteur.hits


def test_a_frozen_worker_fails_an_evaluation_in_bounded_time_as_a_fault(ray_local):
    """Validation and test scoring wait for the workers as a step does (a fault the run recovers
    from), never forever."""
    cfg = small(Path("/nonexistent"), "cluster.step_timeout_s=5", "eval.inner_steps=[0,1]")
    setup = MetaRLSetup.of(cfg)
    theta = setup.build()[2].numpy()
    group = RayMetaRL(setup, 2, state=LearnerState(0, theta))
    assert all(group.ready(60))
    assert evaluate_returns(group, cfg, theta, "val", 4)  # both workers answer
    (victim, _) = processes("ShareWorker")
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        began = time.time()
        with pytest.raises(Exception) as caught:
            evaluate_returns(group, cfg, theta, "val", 4)
        assert is_fault(caught.value) and time.time() - began < 30  # a step's work, a step's 5 s
    finally:
        os.kill(victim.pid, signal.SIGCONT)
        group.close()


def test_distmeta_evaluate_scores_a_meta_rl_checkpoint(ray_local, tmp_path, cli_env):
    result = train(small(tmp_path, "train.steps=2", "train.eval_every=0"), tmp_path / "run")
    checkpoint = result.run_dir / "checkpoints" / "final.pt"
    command = [sys.executable, "-m", "distmeta", "evaluate", "--checkpoint", str(checkpoint), "--steps", "0", "1"]
    evaluated = subprocess.run(command, capture_output=True, text=True, env=cli_env, cwd=ROOT, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "protocol: 3 test tasks of navigation2d (seed 1234), episodes per inner step [3]" in evaluated.stdout
    rows = [line.split() for line in evaluated.stdout.splitlines() if line.split()[2:3] == ["return"]]
    assert [row[:2] for row in rows] == [["3", "0"], ["3", "1"]]
    for row, trained in zip(rows, result.eval_rows):  # the numbers training printed for the same tasks
        assert float(row[3]) == pytest.approx(trained.mean, abs=1e-4)
    assert "evaluated 3/3 tasks" in evaluated.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["task.source=navigaton2d"],
            r"task.source='navigaton2d' is not valid as an environment .*did you mean navigation2d",
        ),
        (["task.source=sinusoid"], r"not valid as an environment \(meta-RL\).*choose one of: navigation2d"),
        (["model.name=conv4"], r"model.name=conv4: use model.name=mlp"),
        (["cluster.gpus_per_worker=1"], r"cluster.gpus_per_worker=1.0: use 0 \(rollouts run on CPUs\)"),
        (["model.head=cosine"], r"model.head=cosine: use linear \(a policy's mean action\)"),
        (
            ["algorithm.name=maml"],
            r"'maml' is not valid on the environment navigation2d .*choose one of: maml_trpo, promp",
        ),
        (["rl.gamma=1.5"], r"rl.gamma must be <= 1, got 1.5"),
        (["rl.action_scale=0"], r"rl.action_scale must be > 0, got 0"),
        (
            ["task.source=cartpole_mass", "rl.action_scale=10"],
            r"rl.action_scale=10.0: use 1 \(discrete actions are indices\)",
        ),
        (["algorithm.name=mmal_trpo"], r"did you mean maml_trpo"),
        (["eval.seed=0"], r"eval.seed=0 \(train.seed's\): use another eval.seed"),
        (["train.seed=4294968530"], r"train.seed=4294968530, eval.seed=1234: use seeds below 2\*\*32"),
        (["meta_optimizer.decay_every=100"], r"decay_every=100: use Adam at a constant meta_optimizer.lr"),
        (["cluster.server_shards=2"], r"cluster.server_shards=2: use 1"),
    ],
)
def test_bad_meta_rl_configs_are_refused_with_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_run(load_config(NAVIGATION, overrides))


def test_a_new_meta_rl_run_refuses_a_setting_its_learner_does_not_read():
    from distmeta.assemble import check_new_run

    for setting in ("algorithm.finetune=all", "algorithm.fce_steps=9"):
        with pytest.raises(ConfigError, match=f"{setting}: maml_trpo does not read it"):
            check_new_run(check_run(load_config(NAVIGATION, [setting])))


def test_a_supervised_config_cannot_take_meta_rl_step_sizes():
    with pytest.raises(ConfigError, match="eval.step_sizes sets meta-RL's test-time step sizes"):
        check_run(load_config(None, ["eval.step_sizes=[0.1]"]))


def test_an_environment_without_its_optional_extra_names_the_install(cli_env, tmp_path):
    """gymnasium made unimportable in a real interpreter: the run stops before Ray starts."""
    code = (
        "import sys; sys.modules['gymnasium'] = None; from distmeta.cli import main; "
        f"sys.exit(main(['train', '--config', 'configs/cartpole_mass_maml_trpo.yaml', 'logdir={tmp_path}']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli_env, cwd=ROOT, timeout=120
    )
    assert done.returncode == 2
    expected = "task.source=cartpole_mass: this environment runs on gymnasium's CartPoleEnv: pip install 'distmeta[rl]'"
    assert expected in done.stderr
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


def test_a_resumed_run_keeps_its_meta_rl_settings(ray_local, tmp_path):
    train(small(tmp_path, "train.steps=2", "train.eval_every=0", "run_name=r"), tmp_path / "r")
    with pytest.raises(ConfigError, match="cannot change rl.max_kl"):
        prepare_resume(str(tmp_path / "r"), ["train.steps=4", "rl.max_kl=0.05"], {})


def test_held_out_scores_do_not_depend_on_the_workers():
    cfg = small(Path("/nonexistent"))
    theta = MetaRLSetup.of(cfg).build()[2].numpy()
    one = LocalMetaRL(MetaRLSetup.of(cfg)).evaluate(theta, "test", range(5), 7, [0.1, 0.05], 3)
    three = LocalMetaRL(MetaRLSetup.of(cfg), shares=3).evaluate(theta, "test", range(5), 7, [0.1, 0.05], 3)
    part = LocalMetaRL(MetaRLSetup.of(cfg)).evaluate(theta, "test", range(2, 4), 7, [0.1, 0.05], 3)
    np.testing.assert_allclose(three, one, rtol=1e-12)
    np.testing.assert_allclose(part, one[2:4], rtol=1e-12)
    assert one.shape == (5, 3) and not np.allclose(one[:, 0], one[0, 0])


def test_sigterm_stops_a_meta_rl_run_with_a_checkpoint_and_resume_finishes_it(ray_local, tmp_path, cli_env):
    overrides = [
        f"logdir={tmp_path}",
        "run_name=stopped",
        *TEST_SIZE,
        "train.steps=200",
        "train.eval_every=0",
        "eval.num_tasks=2",
        "eval.shots=[2]",
        "cluster.num_workers=2",
        "cluster.cpus_per_worker=1",
    ]
    command = [sys.executable, "launch.py", "--config", str(NAVIGATION), *overrides]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env, cwd=ROOT)
    lines = []
    for line in run.stdout:  # the first progress line: steps are running
        lines.append(line)
        if line.startswith("step "):
            run.send_signal(signal.SIGTERM)
            break
    rest, _ = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, "".join(lines) + rest
    assert f"resume with: python launch.py --resume {tmp_path / 'stopped'}" in rest
    stopped_at = read_checkpoint(sorted((tmp_path / "stopped" / "checkpoints").glob("step_*.pt"))[-1])["step"]
    assert 0 < stopped_at < 200
    resumed = [sys.executable, "launch.py", "--resume", str(tmp_path / "stopped"), "train.steps=" + str(stopped_at + 2)]
    done = subprocess.run(resumed, capture_output=True, text=True, env=cli_env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resuming at step {stopped_at}" in done.stdout
    straight = load_config(NAVIGATION, [*overrides, "run_name=straight", f"train.steps={stopped_at + 2}"])
    train(straight, tmp_path / "straight")  # the same run left alone
    assert torch.equal(final_params(tmp_path / "stopped"), final_params(tmp_path / "straight"))


def test_a_killed_meta_rl_driver_resumes_latest_bit_identical_with_each_step_logged_once(ray_local, tmp_path, cli_env):
    """SIGKILL (the OOM killer, kill -9) two steps past the checkpoint at step 6: no handler runs.
    Meta-RL validates a step before it checkpoints it, so `--resume latest` finds the validation of
    step 6 on disk, re-runs steps 7 and 8 (whose logged events it purges) and ends where the run left
    alone ends."""
    overrides = [
        f"logdir={tmp_path}",
        *TEST_SIZE,
        "train.steps=14",
        "train.log_every=2",
        "train.print_every_s=0.001",  # a line a step
        "train.checkpoint_every=6",
        "train.eval_every=6",
        "train.eval_tasks=2",
        "eval.num_tasks=2",
        "eval.shots=[2]",
        "cluster.num_workers=2",
        "cluster.cpus_per_worker=1",
    ]
    command = [sys.executable, "launch.py", "--config", str(NAVIGATION), *overrides, "run_name=killed"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env, cwd=ROOT)
    lines = []
    for line in run.stdout:
        lines.append(line)
        if line.startswith("step 8/"):
            run.kill()
            break
    assert run.wait(timeout=30) == -signal.SIGKILL, "".join(lines) + run.stdout.read()
    killed = tmp_path / "killed"
    assert [p.name for p in sorted((killed / "checkpoints").glob("step_*.pt"))] == ["step_00000006.pt"]

    resumed = [sys.executable, "launch.py", "--resume", "latest", "--logdir", str(tmp_path)]
    done = subprocess.run(resumed, capture_output=True, text=True, env=cli_env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming at step 6" in done.stdout and "validating step 6 again" not in done.stdout
    train(load_config(NAVIGATION, [*overrides, "run_name=straight"]), tmp_path / "straight")
    assert torch.equal(final_params(killed), final_params(tmp_path / "straight"))
    for tag in ("return/after_adaptation", "meta_step/kl", "val/return_shots2_steps1", "test/return_shots2_steps1"):
        runs = [EventAccumulator(str(run)) for run in (killed, tmp_path / "straight")]
        got, want = ([(e.step, e.value) for e in events.Reload().Scalars(tag)] for events in runs)
        assert got == want, tag  # each step once, none lost


def test_a_resume_whose_checkpoint_step_has_no_validation_on_disk_validates_it_first(ray_local, tmp_path, capsys):
    """As after a validation that failed (its checkpoint is still written) or a kill while it was
    being logged: the resumed run validates its start step before the next, and best.pt has it."""
    train(small(tmp_path, "run_name=run", "train.steps=2", "train.eval_every=0"), tmp_path / "run")
    assert "val/return_shots3_steps1" not in EventAccumulator(str(tmp_path / "run")).Reload().Tags()["scalars"]
    cfg, run_dir = prepare_resume(
        str(tmp_path / "run" / "checkpoints" / "step_00000002.pt"), ["train.steps=4", "train.eval_every=2"], {}
    )
    train(cfg, run_dir, resume=True)
    assert "validating step 2 again" in capsys.readouterr().out
    events = EventAccumulator(str(run_dir)).Reload()
    assert [e.step for e in events.Scalars("val/return_shots3_steps1")] == [2, 4]
    assert read_checkpoint(run_dir / "checkpoints" / "best.pt")["step"] in (2, 4)


def test_a_failure_while_logging_the_last_meta_rl_steps_still_leaves_their_checkpoint(ray_local, tmp_path, monkeypatch):
    """The events of the last steps fail to reach the disk (the events folder full, the checkpoints
    elsewhere): the run stops with that error, and the last step is checkpointed all the same."""
    import distmeta.rl.train
    from distmeta.runtime.monitor import EventWriteError

    run_steps = distmeta.rl.train._run_steps

    def then_the_events_folder_fills(cfg, actors, monitor, *rest):
        outcome = run_steps(cfg, actors, monitor, *rest)

        def full():
            raise EventWriteError("the events folder is full")

        monitor.writer.flush = full
        return outcome

    monkeypatch.setattr(distmeta.rl.train, "_run_steps", then_the_events_folder_fills)
    with pytest.raises(EventWriteError, match="the events folder is full"):
        train(small(tmp_path, "run_name=run", "train.steps=3"), tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (
        read_checkpoint(checkpoints / "final.pt")["step"]
        == read_checkpoint(checkpoints / "step_00000003.pt")["step"]
        == 3
    )


def test_an_actor_whose_constructor_raises_stops_the_run_with_its_error(ray_local, tmp_path):
    """Not retried on fewer workers, and not reported as a cluster without room."""
    from distmeta.rl.envs import Navigation2D
    from distmeta.rl.local import LearnerState
    from distmeta.rl.train import Actors
    from distmeta.runtime.supervisor import ActorFailed

    cfg = small(tmp_path)
    broken = type("Broken", (Navigation2D,), {"observation_dim": "two"})  # the policy cannot be built
    setup = MetaRLSetup(broken, MetaRLSetup.of(cfg).cfg, 4, hidden=(8,))
    with pytest.raises(ActorFailed, match="a meta-RL actor did not start: TypeError"):
        Actors(cfg, cfg.cluster, setup, LearnerState(0, np.zeros(3)))
