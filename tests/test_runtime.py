"""The Ray runtime on a real local Ray: results independent of the worker count and the engine,
equal to the same math in one process; TensorBoard holds the run; bad updates and impossible
resource requests stop the run with a clear error."""

import re

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import distmeta
from distmeta.algorithms import initial_parameters
from distmeta.checkpoint import CheckpointStore, read_checkpoint
from distmeta.config import ConfigError, load_config
from distmeta.runtime.control import StepControl
from distmeta.runtime.local import LocalLoop
from distmeta.tasks import build_source
from distmeta.train import train


def small(*overrides):
    return load_config(
        None,
        [
            "cluster.num_workers=1",  # tests choose their layout (auto is tested in test_cluster.py)
            "cluster.cpus_per_worker=1",
            "train.steps=12",
            "train.meta_batch_size=7",  # uneven over 2 and 3 workers
            "train.dtype=float64",
            "train.eval_every=0",
            "train.log_every=4",
            "eval.num_tasks=20",
            "eval.shots=[5]",
            "eval.inner_steps=[1]",
            "algorithm.implementation=vmap",
            "cluster.prefetch_batches=3",
            *overrides,
        ],
    )


def in_process(cfg):
    """The same math without Ray: the package's own loop (one worker, one generator, one server)."""
    loop = LocalLoop(cfg)
    history = loop.run()
    return loop.parameters(), history


def saved_params(result):
    return read_checkpoint(result.checkpoint)["params"].numpy()


ALGORITHMS = {
    "maml": ["algorithm.name=maml", "algorithm.inner_lr=0.01"],
    "metasgd": ["algorithm.name=metasgd", "algorithm.inner_lr=0.01"],  # meta-parameters beyond the model's
    "reptile": [
        "algorithm.name=reptile",
        "algorithm.inner_steps=3",
        "algorithm.inner_lr=0.02",
        "meta_optimizer.name=sgd",
        "meta_optimizer.lr=1.0",
        "meta_optimizer.final_lr=0.1",
    ],
}


@pytest.mark.parametrize("algorithm", ["maml", "metasgd", "reptile"])
def test_workers_and_engines_give_the_parameters_of_a_plain_loop(ray_local, tmp_path, algorithm):
    cfg = small(*ALGORITHMS[algorithm])
    expected, _ = in_process(cfg)
    assert not np.allclose(expected, initial_parameters(cfg, build_source(cfg.task)))
    layouts = [
        # one worker on 2 CPUs splitting its 7 tasks over 2 threads (shares of 3 and 4), inside a Ray
        # actor whose steps run on a compiled-graph thread of Ray's
        (1, 2, "compiled", "threads", 1, 1, "server", 1),
        (2, 1, "compiled", "vmap", 1, 1, "server", 1),
        (3, 1, "compiled", "loop", 2, 2, "server", 1),  # the parameters split across 2 server shards
        (3, 1, "tasks", "vmap", 2, 3, "server", 1),
        # no server: the workers sum over gloo, each steps a copy, three steps a call (calls of 3
        # and 1 steps, as calls end at logging steps; one step a call: test_faults.py)
        (3, 1, "auto", "vmap", 1, 1, "allreduce", 3),
    ]
    if algorithm != "maml":  # what is the algorithm's own in a layout: its parameters sharded, or all-reduced
        layouts = [layouts[2], layouts[4]]
    for workers, cpus, engine, implementation, generators, shards, reduce, steps_per_call in layouts:
        layout = f"{workers} workers x {cpus} CPUs, {engine}, {implementation}, {shards} shards, reduce={reduce}"
        cfg = small(
            *ALGORITHMS[algorithm],
            f"cluster.num_workers={workers}",
            f"cluster.cpus_per_worker={cpus}",
            f"cluster.engine={engine}",
            f"algorithm.implementation={implementation}",
            f"cluster.num_task_generators={generators}",
            f"cluster.server_shards={shards}",
            f"cluster.reduce={reduce}",
            f"cluster.steps_per_call={steps_per_call}",
        )
        result = train(cfg, tmp_path / f"{workers}-{engine}-{implementation}-{shards}-{reduce}")
        np.testing.assert_allclose(saved_params(result), expected, rtol=1e-10, atol=1e-12, err_msg=layout)


def test_checkpoint_holds_parameters_optimizer_step_config_and_the_task_cursor(ray_local, tmp_path):
    cfg = small("train.checkpoint_every=3", "train.checkpoint_keep=2")
    result = train(cfg, tmp_path / "run")
    final = read_checkpoint(result.checkpoint)
    assert final["step"] == 12 and final["config"] == (cfg.to_dict() | {"run_name": "run"})
    assert final["optimizer"]["state"][0]["step"].item() == 12  # Adam's moments came along
    assert final["task_stream"] == {"seed": 0, "next_step": 12, "next_draw": 12}
    assert final["code_version"].startswith(distmeta.__version__)
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000009.pt")["step"] == 9
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "final.pt",
        "step_00000009.pt",
        "step_00000012.pt",
    ]


def test_tensorboard_event_files_hold_the_run(ray_local, tmp_path):
    cfg = small("cluster.num_workers=2", "train.eval_every=6", "train.eval_tasks=10")
    result = train(cfg, tmp_path / "run")
    _, history = in_process(cfg)
    events = EventAccumulator(str(result.run_dir))
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    # training metrics: the mean over each logging window, equal to the same math in one process;
    # the score before adaptation is taken on the window's last step only (it costs a forward pass)
    for end in (4, 8, 12):
        window = history[end - 4 : end]
        after = np.mean([m.train["loss_after"] for m in window])
        assert scalars["train/loss_after"][end] == pytest.approx(after, rel=1e-6)
        assert scalars["train/loss_before"][end] == pytest.approx(window[-1].train["loss_before"], rel=1e-6)
        assert scalars["train/lr"][end] == pytest.approx(1e-3)
    # the step-time breakdown and throughput, per window
    for tag in (
        "time/step_s",
        "time/compute_s",
        "time/aggregate_s",
        "time/data_wait_s",
        "time/coordination_s",
        "workers/0/compute_s",
        "workers/1/compute_s",
        "throughput/tasks_per_s",
    ):
        assert set(scalars[tag]) == {4, 8, 12}, tag
        assert all(v >= 0 for v in scalars[tag].values()), tag
    assert all(v > 0 for v in scalars["time/compute_s"].values())
    # validation during training, the final test evaluation, and the config as text and hparams
    assert set(scalars["val/mse_shots5_steps1"]) == {6, 12}
    # the best validation checkpoint: the parameters of the step with the lowest validation MSE
    validation = scalars["val/mse_shots5_steps1"]
    best = read_checkpoint(result.best_checkpoint)
    assert best["step"] == min(validation, key=validation.get) and best["config"] == cfg.to_dict() | {"run_name": "run"}
    assert best["validation"]["mean"] == pytest.approx(min(validation.values()), rel=1e-6)
    assert best["validation"]["tag"] == "mse_shots5_steps1" and best["validation"]["split"] == "val"
    at_best = LocalLoop(cfg)  # whichever step won: its parameters, made again without Ray
    at_best.run(best["step"])
    np.testing.assert_allclose(best["params"].numpy(), at_best.parameters(), rtol=1e-10, atol=1e-12)
    (row,) = result.eval_rows
    assert scalars["test/mse_shots5_steps1"][12] == pytest.approx(row.mean, rel=1e-6)
    assert scalars["test/mse_shots5_steps1_diverged"][12] == row.diverged
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "inner_lr: 0.01" in text and "num_workers: 2" in text
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(events.PluginTagToContent("hparams"))


def test_steps_with_non_finite_updates_are_rejected_and_a_run_of_them_stops_training(ray_local, tmp_path, capsys):
    cfg = small("train.dtype=float32", "algorithm.inner_lr=1e38", "cluster.num_workers=2", "train.max_rejected_steps=4")
    stop = r"4 steps in a row had non-finite updates \(the last at step 3\); none was applied. Start a new run"
    with pytest.raises(FloatingPointError, match=stop):  # not --resume, which keeps the learning rates
        train(cfg, tmp_path / "run")
    out = capsys.readouterr().out
    assert "step 0 rejected: worker 0 sent a non-finite update for tasks 0..3 of the step's meta-batch" in out
    assert "step 0 rejected: worker 1 sent a non-finite update for tasks 4..6" in out


def test_a_resumed_run_counts_rejected_steps_on_from_its_earlier_part(ray_local, tmp_path, capsys):
    from distmeta.resume import prepare_resume

    bad = ["train.dtype=float32", "algorithm.inner_lr=1e38", "train.steps=8", "train.checkpoint_every=4"]
    train(small(*bad, "train.max_rejected_steps=100", f"logdir={tmp_path}", "run_name=run"), tmp_path / "run")
    out = capsys.readouterr().out
    assert all(f"step {k} rejected: " in out for k in range(8))  # all 8 rejected, under the limit
    cfg, run_dir = prepare_resume(str(tmp_path / "run"), ["train.steps=12", "train.max_rejected_steps=10"], {})
    stop = r"10 steps in a row had non-finite updates \(the last at step 9\)"  # 8 before the resume, 2 after
    with pytest.raises(FloatingPointError, match=stop):
        train(cfg, run_dir, resume=True)
    events = EventAccumulator(str(run_dir))
    events.Reload()
    counted = {e.step: e.value for e in events.Scalars("faults/rejected_steps")}
    assert counted == {step: float(step) for step in range(1, 11)}  # one count, on across the resume


def test_steps_applied_before_a_fault_dropped_their_results_still_get_their_checkpoint(ray_local, tmp_path):
    """A straggler can finish while its step is cancelled, and a call of several steps can fail
    after applying some: the servers are then past the failed step, and what those steps were due
    (here step 5's checkpoint and validation) is made from the state the servers hold."""
    from distmeta.checkpoint import BestCheckpoint
    from distmeta.evaluate import eval_shots, eval_steps
    from distmeta.runtime.control import Schedule
    from distmeta.runtime.monitor import Monitor, validation_logged
    from distmeta.runtime.supervisor import Supervisor
    from distmeta.train import StepResults

    cfg = small("train.steps=20", "train.checkpoint_every=5", "train.eval_every=5", "train.eval_tasks=4")
    cfg = load_config(None, ["cluster.gpus_per_worker=0"], base=cfg.to_dict())  # the layout train would plan
    store = CheckpointStore(tmp_path / "checkpoints")
    supervisor = Supervisor(cfg, initial_parameters(cfg, build_source(cfg.task)), store.location)
    results = StepResults(cfg, Monitor(tmp_path, cfg), store, BestCheckpoint(cfg, store))
    try:
        supervisor.start()
        for step in range(7):  # steps 0-3 handled; the fault drops the results of 4-6, which the server applied
            controls = Schedule.of(cfg.train).controls(step, 1, supervisor.generation)
            outcome = supervisor.engine.result(supervisor.engine.submit(controls), 60)
            if step < 4:
                results.handle_all(outcome)
        assert store.step_files() == []
        results.catch_up(supervisor, range(4 + 1, supervisor.status().step + 1))
        ((at, name),) = store.step_files()
        written = read_checkpoint(store.uri(name))
        assert at == written["step"] == 7
        seven = LocalLoop(cfg)  # the parameters after 7 steps, made again without Ray
        seven.run(7)
        np.testing.assert_allclose(written["params"].numpy(), seven.parameters(), rtol=1e-10, atol=1e-12)
        # validated and logged before the checkpoint was written: a resume from step 7, off the
        # schedule, would not know to repeat a validation lost with the run
        assert not results.evaluations
        assert validation_logged(tmp_path, 7, rows=len(eval_shots(cfg)) * len(eval_steps(cfg)))
        assert read_checkpoint(tmp_path / "checkpoints" / "best.pt")["step"] == 7  # and the only one
    finally:
        supervisor.close()
        supervisor.kill_all()
        results.monitor.close()


def test_a_failure_while_logging_the_last_steps_still_leaves_their_checkpoint(ray_local, tmp_path, monkeypatch):
    """The events of the last steps fail to write (the events folder full, the checkpoints elsewhere)
    or their validation fails: the run stops with that error, its last step checkpointed."""
    from distmeta.runtime.monitor import EventWriteError
    from distmeta.train import StepResults

    logged_before_checkpoint = StepResults.logged_before_checkpoint

    def fails_at_the_end(self, step):
        if step == 6 + 1:  # after the last step, its validation included
            raise EventWriteError("the events folder is full")
        logged_before_checkpoint(self, step)

    cfg = small("train.steps=6", "train.checkpoint_every=4")
    monkeypatch.setattr(StepResults, "logged_before_checkpoint", fails_at_the_end)
    with pytest.raises(EventWriteError, match="the events folder is full"):
        train(cfg, tmp_path / "run")
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "final.pt")["step"] == 6


def test_a_failed_validation_is_skipped_and_a_run_of_them_stops_training(ray_local, tmp_path, capsys):
    """Each validation here is a real Ray task; the failing ones get a parameter vector too short
    for the model."""
    from distmeta.checkpoint import BestCheckpoint
    from distmeta.runtime.monitor import Monitor
    from distmeta.train import StepResults

    cfg = small("train.eval_tasks=4")
    store = CheckpointStore(tmp_path / "checkpoints")
    results = StepResults(cfg, Monitor(tmp_path, cfg), store, BestCheckpoint(cfg, store))
    good = initial_parameters(cfg, build_source(cfg.task))
    try:
        for at, params in [(4, good[:3]), (8, good), (12, good[:3]), (16, good[:3])]:
            results.validate(at, params)
        results.collect_evaluations(waiting_before=17)
        out = capsys.readouterr().out
        assert "validation after 4 steps failed; training goes on without it: " in out
        assert results.failed_validations == [12, 16] and not results.failure  # 8's success reset the count
        assert read_checkpoint(tmp_path / "checkpoints" / "best.pt")["step"] == 8
        results.validate(20, good[:3])
        results.collect_evaluations(waiting_before=21)
        assert results.failure.startswith("validation failed after steps 12, 16, 20, in a row; the last: ")
    finally:
        results.monitor.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    counted = {e.step: e.value for e in events.Scalars("faults/failed_validations_in_a_row")}
    assert counted == {4: 1, 8: 0, 12: 1, 16: 2, 20: 3}


def test_a_validation_stuck_past_the_step_timeout_is_cancelled_and_counts_as_failed(ray_local, tmp_path, capsys):
    """A checkpoint waits for the validations before it; one stuck (on a read that never returns)
    must not hold training up for ever."""
    import time

    import ray

    from distmeta.checkpoint import BestCheckpoint
    from distmeta.evaluate import evaluation_chunks
    from distmeta.runtime.monitor import Monitor
    from distmeta.train import PendingValidation, StepResults

    @ray.remote(num_cpus=0)
    def stuck():
        time.sleep(600)

    cfg = small("cluster.step_timeout_s=3")
    store = CheckpointStore(tmp_path / "checkpoints")
    results = StepResults(cfg, Monitor(tmp_path, cfg), store, BestCheckpoint(cfg, store))
    validation = stuck.remote()
    results.evaluations.append(PendingValidation(4, np.zeros(3), [(evaluation_chunks(cfg, 4), validation)]))
    began = time.time()
    try:
        results.collect_evaluations(waiting_before=5)
    finally:
        results.monitor.close()
    assert time.time() - began < 30 and results.failed_validations == [4] and not results.evaluations
    assert (
        "validation after 4 steps failed; training goes on without it: GetTimeoutError: the evaluation did not "
        "finish within 3 s; its tasks were cancelled" in capsys.readouterr().out
    )
    with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError)):
        ray.get(validation, timeout=30)  # cancelled, not left running


def test_failing_validations_stop_the_run_at_a_logging_step_with_a_checkpoint(ray_local, tmp_path, monkeypatch):
    from distmeta.resume import prepare_resume
    from distmeta.run import EvaluationFailed
    from distmeta.train import StepResults

    validate = StepResults.validate
    monkeypatch.setattr(StepResults, "validate", lambda self, at, p: validate(self, at, p[:3] if at >= 4 else p))
    # a checkpoint waits for the validations before it: the stop comes soon after step 12's, whatever the timing
    cfg = small("train.steps=40", "train.eval_every=2", "train.eval_tasks=4", "train.checkpoint_every=4")
    cfg = load_config(None, [f"logdir={tmp_path}", "run_name=run"], base=cfg.to_dict())
    stop = r"training stopped at step (\d+): validation failed after steps 4, 6, 8, in a row; the last: .*--resume"
    with pytest.raises(EvaluationFailed, match=stop) as stopped:
        train(cfg, tmp_path / "run")
    at = int(re.match(stop, str(stopped.value)).group(1))
    assert 8 < at <= 24 and at % cfg.train.log_every == 0  # a logging boundary: the resumed run's windows are whole
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / f"step_{at:08d}.pt")["step"] == at
    monkeypatch.setattr(StepResults, "validate", validate)  # the validation fixed: the run goes on
    cfg, run_dir = prepare_resume(str(tmp_path / "run"), [], {})
    assert read_checkpoint(train(cfg, run_dir, resume=True).checkpoint)["step"] == 40


def test_a_failed_test_evaluation_names_the_trained_checkpoint(ray_local, tmp_path, monkeypatch):
    import distmeta.train
    from distmeta.run import EvaluationFailed

    submit = distmeta.train.submit_evaluation
    monkeypatch.setattr(
        distmeta.train,
        "submit_evaluation",
        lambda cfg, p, split, **kw: submit(cfg, p[:3] if split == "test" else p, split, **kw),
    )
    final = tmp_path / "run" / "checkpoints" / "final.pt"
    with pytest.raises(EvaluationFailed, match=f"its test evaluation failed: .*distmeta evaluate --checkpoint {final}"):
        train(small("train.steps=4"), tmp_path / "run")
    assert read_checkpoint(final)["step"] == 4


def test_resources_the_cluster_lacks_fail_at_once(ray_local, tmp_path):
    with pytest.raises(ConfigError, match=r"1 GPUs, but the Ray cluster has 0 .*CPU=4"):
        train(small("cluster.gpus_per_worker=1"), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"server_resource='head', but no node .* has that resource"):
        train(small("cluster.server_resource=head"), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"server_shards=40: .* at most 28 \(one per 64 parameters\)"):
        train(small("cluster.server_shards=40"), tmp_path / "run")  # the 1,761 parameters of the sinusoid MLP


def test_best_checkpoint_wants_fewer_diverged_tasks_then_a_better_mean(tmp_path):
    from distmeta.checkpoint import BestCheckpoint
    from distmeta.report import EvalRow

    def kept_steps(metric, offers):
        best, kept = BestCheckpoint(small(), CheckpointStore(tmp_path / metric)), []
        for step, (mean, diverged) in enumerate(offers, start=1):
            best.offer(step, np.full(3, float(step)), [EvalRow(0, 5, 1, metric, mean, 0.0, mean, diverged, 20)])
            state = read_checkpoint(best.location)
            assert state["params"].tolist() == [float(state["step"])] * 3  # the parameters of that step
            kept.append(state["step"])
        return kept

    # MSE: lower is better; a diverged task outweighs any mean; NaN and ties never replace
    mse = [(0.5, 0), (0.4, 1), (0.6, 0), (float("nan"), 0), (0.5, 0), (0.3, 0)]
    assert kept_steps("mse", mse) == [1, 1, 1, 1, 1, 6]
    assert kept_steps("accuracy", [(0.5, 0), (0.7, 0), (0.6, 0), (0.7, 0)]) == [1, 2, 2, 2]
    # a task that blew up makes the mean infinite: it still ranks, by its diverged count first
    assert kept_steps("return", [(-float("inf"), 2), (-5.0, 2), (-float("inf"), 1)]) == [1, 2, 3]


def test_a_diverged_task_swamps_the_mean_and_sorts_last_for_the_median():
    """A score that is not finite counts as the worst there is, not as absent: the mean says a task
    blew up, the median holds while fewer than half did, and every task is counted."""
    import math

    from distmeta.report import format_rows, scored_row

    finite = scored_row(np.array([1.0, 2.0, 3.0]), 0, ways=0, shots=5, steps=1, metric="mse")
    assert (finite.mean, finite.median, finite.tasks) == (2.0, 2.0, 3)
    assert finite.ci95 == pytest.approx(1.96 * 1.0 / math.sqrt(3))  # the sample standard deviation, 1
    mse = scored_row(np.array([1.0, 2.0, 3.0, np.nan]), 1, ways=0, shots=5, steps=1, metric="mse")
    assert (mse.mean, mse.median, mse.tasks) == (math.inf, 2.5, 4) and math.isnan(mse.ci95)
    returns = scored_row(np.array([10.0, np.inf, 20.0, np.nan, 30.0]), 2, ways=0, shots=5, steps=1, metric="return")
    assert (returns.mean, returns.median) == (-math.inf, 10.0)  # worst for a return: -inf, twice
    assert "inf" in format_rows([mse]).splitlines()[1].split()


def test_a_resumed_runs_best_checkpoint_competes_only_under_the_same_protocol(tmp_path, capsys):
    """Validation over more tasks, or other episodes (eval.seed), after a resume is another measure:
    the earlier best is kept aside, not compared with."""
    from distmeta.checkpoint import BestCheckpoint
    from distmeta.report import EvalRow

    store = CheckpointStore(tmp_path)
    BestCheckpoint(small(), store).offer(3, np.full(3, 3.0), [EvalRow(0, 5, 1, "mse", 0.1, 0.0, 0.1, 0, 20)])
    resumed = BestCheckpoint(small(), store)  # the earlier part's best: 0.1 over 20 tasks
    resumed.offer(4, np.full(3, 4.0), [EvalRow(0, 5, 1, "mse", float("nan"), 0.0, 0.1, 0, 200)])
    assert read_checkpoint(resumed.location)["step"] == 3  # a non-finite score changes nothing
    resumed.offer(5, np.full(3, 5.0), [EvalRow(0, 5, 1, "mse", 0.3, 0.0, 0.3, 1, 200)])
    assert read_checkpoint(resumed.location)["step"] == 5  # worse than 0.1, but over 200 tasks: a new measure
    assert read_checkpoint(tmp_path / "best-mse_shots5_steps1-20tasks-step3.pt")["step"] == 3
    assert "best.pt starts afresh (the earlier best is kept as best-mse_shots5_steps1-20tasks-step3.pt)" in (
        capsys.readouterr().out
    )
    resumed.offer(6, np.full(3, 6.0), [EvalRow(0, 5, 1, "mse", 0.4, 0.0, 0.4, 0, 200)])
    assert read_checkpoint(resumed.location)["step"] == 6  # fewer diverged, under the same measure
    other_episodes = BestCheckpoint(load_config(None, ["eval.seed=7"], base=small().to_dict()), store)
    other_episodes.offer(7, np.full(3, 7.0), [EvalRow(0, 5, 1, "mse", 0.9, 0.0, 0.9, 0, 200)])
    assert read_checkpoint(other_episodes.location)["step"] == 7  # the same row over other episodes


def test_the_schedule_names_each_step_s_extras():
    """One schedule for the driver, the asynchronous server and the monitors: windows end every
    log_every steps, at each checkpoint and at the run's end; checkpoints and published parameters
    on their own intervals."""
    from distmeta.runtime.control import Schedule

    schedule = Schedule.of(small("train.steps=10", "train.checkpoint_every=4", "train.eval_every=6").train)
    assert [done for done in range(1, 11) if schedule.logs(done)] == [4, 8, 10]
    assert [schedule.checkpoint(done) for done in (4, 5, 8)] == ["step_00000004.pt", None, "step_00000008.pt"]
    assert [done for done in range(1, 11) if schedule.publishes(done)] == [6]
    assert schedule.control(7, generation=2) == StepControl(7, 2, "step_00000008.pt", publish=False, score_before=True)
    assert schedule.control(4) == StepControl(4, 0, None, publish=False, score_before=False)
    # a checkpoint ends a window too: a run resumed from it starts one there, as the run left alone does
    apart = Schedule.of(small("train.steps=10", "train.log_every=4", "train.checkpoint_every=6").train)
    assert [done for done in range(1, 11) if apart.logs(done)] == [4, 6, 8, 10]
    never = Schedule.of(small("train.checkpoint_every=0", "train.eval_every=0").train)
    assert not any(never.checkpoint(done) or never.publishes(done) for done in range(1, 13))
    # a call of several steps (cluster.steps_per_call) ends at a logging step at the latest
    calls, step = [], 0
    while step < 10:
        calls.append([control.step for control in schedule.controls(step, 3, generation=2)])
        step = calls[-1][-1] + 1
    assert calls == [[0, 1, 2], [3], [4, 5, 6], [7], [8, 9]]
    assert schedule.controls(6, 3, generation=2) == [schedule.control(s, 2) for s in (6, 7)]
