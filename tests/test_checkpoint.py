"""Checkpoint files: atomic, checksummed, pruned to the newest N, on a local folder or a pyarrow.fs
URI; a corrupted one is skipped for the one before; a full disk or an unwritable folder is a clear
error that leaves the earlier checkpoints as they were."""

import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from distmeta.checkpoint import (
    CheckpointError,
    CheckpointStore,
    git_commit,
    join_location,
    read_checkpoint,
    split_location,
    step_name,
)
from distmeta.config import load_config
from distmeta.runtime.control import MetaOptimizerStatus, Rejection, StepControl, WorkerTiming, WorkerUpdate
from distmeta.runtime.meta_optimizer import checkpoint_state
from distmeta.runtime.parameter_server import ParameterServer


def state(step: int, size: int = 8) -> dict:
    return {"params": torch.full((size,), float(step)), "config": {}, "step": step}


def raw(store: CheckpointStore, name: str) -> bytes:
    with store.fs.open_input_file(store.path(name)) as f:
        return f.read()


def put(store: CheckpointStore, name: str, data: bytes) -> None:
    with store.fs.open_output_stream(store.path(name)) as f:
        f.write(data)


@pytest.mark.parametrize("where", ["path", "file://", "s3://"])
def test_the_newest_n_are_kept_and_a_corrupted_one_is_skipped_for_the_one_before(tmp_path, where, request, caplog):
    location = {"path": tmp_path / "run", "file://": f"file://{tmp_path}/run"}.get(where)
    store = CheckpointStore(location or request.getfixturevalue("s3_server")("run"))
    for step in range(10, 60, 10):
        store.write(step_name(step), state(step))
        store.prune(3)
    assert [step for step, _ in store.step_files()] == [30, 40, 50]
    assert store.latest()[1]["step"] == 50
    data = bytearray(raw(store, step_name(50)))
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the middle of the payload
    put(store, step_name(50), bytes(data))
    with pytest.raises(CheckpointError, match="checksum|cannot be read"):
        read_checkpoint(store.uri(step_name(50)))
    name, found = store.latest()
    assert (name, found["step"]) == (step_name(40), 40)
    assert "skipping checkpoint" in caplog.text and step_name(50) in caplog.text
    put(store, step_name(40), bytes(data[:100]))  # truncated
    assert store.latest()[1]["step"] == 30
    # a well-formed file whose tensor bytes were altered after the checksum was taken
    altered = bytearray(raw(store, step_name(30)))
    at = altered.rfind(np.float32(30.0).tobytes())  # the parameters' bytes
    altered[at : at + 4] = np.float32(31.0).tobytes()
    put(store, step_name(30), bytes(altered))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        read_checkpoint(store.uri(step_name(30)))
    left = store.fs.get_file_info(pafs.FileSelector(store.root))
    assert sorted(info.base_name for info in left) == [step_name(s) for s in (30, 40, 50)]  # no temp files


def test_the_code_version_is_dirty_for_changed_code_not_for_a_run_folder_in_the_checkout(tmp_path):
    """A run inside the checkout (zoo/runs) changes tracked files as it goes: its checkpoints must
    still name the commit as clean. A changed or new file of the package makes it dirty."""
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "code.py").write_text("x = 1\n")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "step.pt").write_bytes(b"0")
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path / "pkg") == head
    (tmp_path / "runs" / "step.pt").write_bytes(b"1")  # the run wrote a checkpoint
    (tmp_path / "runs" / "best.pt").write_bytes(b"1")
    assert git_commit(tmp_path / "pkg") == head
    (tmp_path / "pkg" / "new.py").write_text("y = 2\n")
    assert git_commit(tmp_path / "pkg") == f"{head}+dirty"
    (tmp_path / "pkg" / "new.py").unlink()
    (tmp_path / "pkg" / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path / "pkg") == f"{head}+dirty"
    assert git_commit(tmp_path.parent / "no_such_folder") == ""


def test_a_uri_query_stays_at_the_end_of_the_paths_made_from_it():
    """pyarrow reads an S3-compatible store's endpoint from the URI's query (MinIO, Ceph, R2)."""
    uri = "s3://bucket/runs?endpoint_override=minio:9000&scheme=http"
    assert join_location(uri, "run") == "s3://bucket/runs/run?endpoint_override=minio:9000&scheme=http"
    assert split_location(join_location(uri, step_name(5))) == (uri, step_name(5))
    assert join_location("/data/runs/", "run") == "/data/runs/run"
    assert split_location("/data/runs/final.pt") == ("/data/runs", "final.pt")
    assert split_location("final.pt") == (".", "final.pt")


def test_a_full_disk_fails_the_write_clearly_and_keeps_the_earlier_checkpoint(tmp_path):
    """A real write error from the OS: the file-size limit (RLIMIT_FSIZE) makes write() fail with
    EFBIG past 64 KiB, as a full disk fails it with ENOSPC."""
    store = CheckpointStore(tmp_path)
    store.write(step_name(1), state(1))
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from distmeta.checkpoint import CheckpointStore, CheckpointError, step_name
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        store = CheckpointStore({str(tmp_path)!r})
        try:
            store.write(step_name(1), {{"params": torch.zeros(1 << 20), "config": {{}}, "step": 2}})
        except CheckpointError as err:
            print(err)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "could not write checkpoint" in out.stdout and "disk is full" in out.stdout, out.stdout + out.stderr
    assert "--resume latest" in out.stdout
    assert read_checkpoint(tmp_path / step_name(1))["step"] == 1  # the earlier file is whole
    assert [p.name for p in tmp_path.iterdir()] == [step_name(1)]  # no temporary file left behind


def test_an_unwritable_or_unknown_location_is_named(tmp_path, s3_server):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(CheckpointError, match="cannot write checkpoints to .*a-file/run"):
        CheckpointStore(tmp_path / "a-file" / "run").check_writable()
    missing_bucket = s3_server("run").replace("@tests/", "@no-such-bucket/")
    with pytest.raises(CheckpointError, match="cannot write checkpoints to s3://.*Bucket 'no-such-bucket' not found"):
        CheckpointStore(missing_bucket).check_writable()
    with pytest.raises(CheckpointError, match="not a filesystem pyarrow can open"):
        CheckpointStore("nosuchscheme://bucket/run")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")


def test_the_server_restores_parameters_optimizer_step_and_rng_from_its_newest_checkpoint(tmp_path):
    cfg = load_config(None, ["train.dtype=float64", "train.checkpoint_keep=2"])
    server, store = ParameterServer(cfg, np.zeros(4), str(tmp_path)), CheckpointStore(str(tmp_path))
    for step in range(3):
        update = WorkerUpdate(step, 0, step, np.arange(4.0) + step, True, 0, {}, "loop", WorkerTiming(0, 1, 0, 0, 0))
        metrics = server.apply(StepControl(step, checkpoint=step_name(step + 1)), update)
        if step < 2:  # the driver writes what the server sends at a checkpoint step
            store.write(metrics.checkpoint, checkpoint_state(cfg, [metrics.state]))
            store.prune(2)
    torch.manual_seed(7)
    store.write(step_name(3), checkpoint_state(cfg, [server.state()]))
    store.prune(2)
    expected_draw = torch.rand(3)
    restarted = ParameterServer(cfg, np.zeros(4), str(tmp_path))
    assert restarted.status() == MetaOptimizerStatus(step=3, restored_from=str(tmp_path / step_name(3)), next_draw=3)
    np.testing.assert_array_equal(restarted.parameters(), server.parameters())
    assert torch.equal(torch.rand(3), expected_draw)  # the process RNG continues where it was saved
    moments = restarted.meta.optimizer.state_dict()["state"][0]
    assert moments["step"].item() == 3
    assert torch.equal(moments["exp_avg"], server.meta.optimizer.state_dict()["state"][0]["exp_avg"])
    assert [s for s, _ in restarted.store.step_files()] == [2, 3]


def test_a_step_with_a_non_finite_update_is_rejected_whole_and_reported(tmp_path):
    cfg = load_config(None, ["train.dtype=float64"])
    server = ParameterServer(cfg, np.ones(3))

    def result(rank, first, update):
        finite = bool(np.isfinite(update).all())
        timing = WorkerTiming(rank, 4, 0, 0, 0)
        return WorkerUpdate(0, 0, 0, np.array(update), finite, first, {"loss": 1.0}, "loop", timing)

    metrics = server.apply(StepControl(0), result(0, 0, [1.0, 1.0, 1.0]), result(1, 4, [1.0, np.inf, 1.0]))
    assert metrics.rejected == [Rejection(rank=1, tasks=(4, 8))]
    np.testing.assert_array_equal(server.parameters(), np.ones(3))  # nothing applied, not even worker 0's part
    assert server.status().step == 1 and server.meta.rejected_steps == [0]
    assert server.meta.optimizer.state_dict()["state"] == {}  # Adam never stepped


def test_every_model_in_the_zoo_loads_checked_and_fits_its_config():
    """zoo/ ships exported models: each must read through the checksummed loader, hold parameters
    alone (no optimizer state; the transfer baseline no head over its training classes either), stay
    under 1 MB and, for meta-RL, fit the policy its config builds."""
    from pathlib import Path

    from distmeta.checkpoint import load_checkpoint
    from distmeta.evaluate import without_training_head
    from distmeta.rl.setup import MetaRLSetup, is_meta_rl

    models = sorted((Path(__file__).parent.parent / "zoo").glob("*.pt"))
    assert models, "zoo/ has no exported model"
    for path in models:
        cfg, flat, state = load_checkpoint(path)
        assert path.stat().st_size < 1 << 20, path
        assert "optimizer" not in state and np.isfinite(flat).all(), path
        if is_meta_rl(cfg):
            assert len(flat) == len(MetaRLSetup.of(cfg).build()[2]), path
        elif cfg.task.labels == "class":  # the baseline: nothing left to take off
            assert without_training_head(cfg, flat).size == flat.size, path


def test_checkpoint_show_says_what_a_file_holds_and_what_it_is_good_for(tmp_path, capsys):
    """`distmeta checkpoint show`: the learner, model and its parameter count, the data, the steps
    of the budget, the code, the score it was kept for and what it is good for; a resumable
    checkpoint is told from the rest, a newer version and an unreadable config are flagged, and a
    file that is no checkpoint is named while the others are still shown."""
    import hashlib
    import json

    import distmeta
    from distmeta.checkpoint import checkpoint_record
    from distmeta.cli import main

    cfg = load_config(overrides=["train.steps=300"])  # sinusoid MAML: an MLP 1 -> 40 -> 40 -> 1
    store = CheckpointStore(tmp_path)
    params = torch.zeros(1 * 40 + 40 + 40 * 40 + 40 + 40 * 1 + 1)
    training = store.write(step_name(200), checkpoint_record(cfg, params, 200) | {"optimizer": {"state": {}}})
    score = {"split": "val", "tag": "mse_shots10_steps1", "mean": 0.034, "ci95": float("nan"), "tasks": 1}
    best = store.write("best.pt", checkpoint_record(cfg, params, 100) | {"validation": score})
    newer = store.write("newer.pt", checkpoint_record(cfg, params, 300) | {"distmeta_version": "99.0.0"})
    (tmp_path / "notes.txt").write_text("not a checkpoint")

    assert main(["checkpoint", "show", training, str(tmp_path / "notes.txt"), best, newer]) == 2
    out, err = capsys.readouterr()
    assert f"use        resumes (distmeta train --resume {training}), evaluates" in out
    assert "maml on mlp (hidden [40, 40]): 1,761 parameters, float32" in out
    assert "task       sinusoid regression, 10 support and 10 query points per task" in out
    assert f"200 of 300 steps, the last of them by distmeta {distmeta.__version__}" in out
    assert "validation mse_shots10_steps1 0.034 ± n/a on 1 val tasks" in out
    assert "adapts" not in out  # adapt classifies images; a regression checkpoint cannot
    assert out.count("warning") == 1 and "written by distmeta 99.0.0, newer than this" in out
    assert out.count("checksum verified") == 3 and "notes.txt cannot be read" in err  # the others still shown

    damaged_config = checkpoint_record(cfg, params, 100)
    damaged_config["config"]["algorithm"]["name"] = ["maml"]
    unreadable = store.write("unreadable.pt", damaged_config)
    assert main(["checkpoint", "show", "--json", best, f"file://{unreadable}"]) == 0
    first, second = json.loads(capsys.readouterr().out)
    assert first["resumable"] is False and first["step"] == 100 and first["warning"] == ""
    assert first["validation"]["mean"] == 0.034 and first["config"]["train"]["steps"] == 300
    with open(best, "rb") as f:
        assert first["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert "cannot read its config" in second["warning"] and "use distmeta" not in second["warning"]
    assert second["uses"] == "" and second["step"] == 100  # a file of this version: no other to suggest


def test_every_model_in_the_zoo_is_finished_and_readable_by_this_version():
    """What `distmeta checkpoint show zoo/*.pt` prints about the shipped models: each at its full
    budget, parameters without optimizer state, nothing this version cannot read, and the uses its
    kind has (an image classifier adapts; meta-RL policies and the baseline's headless export do not
    start runs or adapt where they cannot)."""
    from pathlib import Path

    from distmeta.checkpoint_summary import summarize

    models = sorted((Path(__file__).parent.parent / "zoo").glob("*.pt"))
    assert models, "zoo/ has no exported model"
    for path in models:
        summary = summarize(path)
        assert not summary.resumable and summary.warning == "", (path, summary)
        assert summary.step == summary.steps > 0, (path, summary.step, summary.steps)
        meta_rl = summary.algorithm in ("maml_trpo", "promp")
        assert ("(meta-RL)" in summary.task) == meta_rl and ("adapts" in summary.uses) != meta_rl, summary
        assert ("train.init_from" in summary.uses) == (summary.algorithm != "baseline"), summary


ZOO_ROWS = {  # a zoo model, its row's test-time settings, the inner steps and episodes it is scored at, the print
    "omniglot_protonet_1shot.pt": ([], 0, 1000, "5-way {mean} ± {ci} (median {median})"),
    "omniglot_baseline.pt": (
        ["algorithm.head_init=centroid", "eval.inner_steps=[0]"],
        0,
        1000,
        "nearest centroid (`algorithm.head_init=centroid --steps 0`) {mean} ± {ci}",
    ),
    "omniglot_maml_5w1s.pt": ([], 3, 600, "after 3 steps {mean} ± {ci} (median {median})"),
}


@pytest.mark.parametrize("name", list(ZOO_ROWS))
def test_the_zoo_models_reproduce_their_readme_rows_on_shards_built_here(omniglot_shards, name):
    """zoo/README.md's promise: `distmeta data build omniglot` gives the shards the zoo's models were
    trained on (the same fingerprint), and `distmeta evaluate --checkpoint zoo/<name>.pt` gives the
    row's numbers. Checked for the ProtoNets model and the baseline's nearest centroids (1,000 test
    episodes, 5-way 1-shot) and for MAML after its 3 test steps (600): about a minute each on one core."""
    import dataclasses
    from pathlib import Path

    from distmeta.checkpoint import load_checkpoint
    from distmeta.config import load_config
    from distmeta.evaluate import evaluate
    from distmeta.tasks.episodes import ShardEpisodes

    zoo = Path(__file__).parent.parent / "zoo"
    overrides, steps, episodes, printed_as = ZOO_ROWS[name]
    saved, params, _ = load_checkpoint(zoo / name)
    cfg = load_config(None, overrides, base=saved.to_dict())
    cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, shards=str(omniglot_shards)))
    ShardEpisodes.check_same_data(saved.task, cfg.task)  # the data it was trained on, moved here
    (row,) = [row for row in evaluate(cfg, params) if row.steps == steps]
    assert (row.metric, row.tasks) == ("accuracy", episodes)
    scores = {k: f"{100 * getattr(row, k):.1f}" for k in ("mean", "ci95", "median")}
    printed = printed_as.format(mean=scores["mean"], ci=scores["ci95"], median=scores["median"])
    (line,) = [line for line in (zoo / "README.md").read_text().splitlines() if line.startswith(f"| `{name}`")]
    assert printed in line, printed
