"""No file distmeta reads runs code: checkpoints, shards and their manifest, configs.

Each hostile file here would create a marker file if anything unpickled or otherwise executed it;
every test checks the marker is absent as well as the clear error the user gets. Checkpoints are
tensor files (``distmeta.tensorfile``): the format's round trip, its damage detection and its
interoperability with the safetensors library are tested here too."""

import hashlib
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from distmeta import tensorfile
from distmeta.checkpoint import CheckpointError, CheckpointStore, convert_legacy, read_checkpoint, step_name
from distmeta.config import Config, ConfigError, load_config
from distmeta.data.shards import MANIFEST, ShardedDataset, ShardError

ROOT = Path(__file__).resolve().parent.parent


class OpensAFile:
    """What an attacker puts in a pickle: unpickling it calls ``open(marker, "w")``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def pickled(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def legacy_checkpoint(state: dict) -> bytes:
    """A checkpoint as distmeta 0.1 wrote it: a torch.save envelope around a torch.save payload,
    with the payload's SHA-256 (which an attacker computes as easily as we do)."""
    payload = pickled(state)
    return pickled({"distmeta_checkpoint": 2, "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload})


def server_like_state(seed: int = 0) -> dict:
    """What a parameter server checkpoints: Adam's state, the process RNGs, nested plain data."""
    torch.manual_seed(seed)
    theta = torch.nn.Parameter(torch.randn(37, dtype=torch.float64))
    optimizer = torch.optim.Adam([theta], lr=1e-3, fused=True)
    theta.grad = torch.randn_like(theta)
    optimizer.step()
    return {
        "params": theta.detach().clone(),
        "optimizer": optimizer.state_dict(),
        "step": 7,
        "task_stream": {"seed": seed, "next_step": 7, "next_draw": 7},
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "rejected_steps": [3],
        "config": Config().to_dict(),
        "code_version": "test",
        "validation": {"mean": float("nan"), "row": {"steps": 1, "ci95": np.float64(0.5)}},
    }


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, float) and a != a:
        assert b != b
    else:
        assert a == b and type(a) is type(b)


def test_a_tensor_file_gives_back_exactly_what_was_stored_and_safetensors_reads_it():
    state = server_like_state()
    data = tensorfile.dumps(state)
    back = tensorfile.loads(data)
    expected = dict(state, validation={"mean": float("nan"), "row": {"steps": 1, "ci95": 0.5}})  # numpy scalars: floats
    assert_same(expected, back)
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(37, dtype=torch.float64))], fused=True)
    optimizer.load_state_dict(back["optimizer"])  # integer keys survived: the moments are really loaded
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    np.random.set_state(back["rng"]["numpy"])
    random.setstate(back["rng"]["python"])
    import safetensors.torch as safetensors  # a dev dependency: missing, the test fails

    assert torch.equal(safetensors.load(data)["params"], state["params"])


def test_any_damage_to_a_tensor_file_is_a_clear_error_never_a_crash():
    data = tensorfile.dumps(server_like_state())
    rng = np.random.default_rng(0)
    damaged = [data[:n] for n in [0, 7, 8, 9, 100, len(data) // 2, len(data) - 1]]
    for at in rng.integers(0, len(data), 300):
        flipped = bytearray(data)
        flipped[at] ^= 1 << int(rng.integers(0, 8))
        damaged.append(bytes(flipped))
    for bad in damaged:
        with pytest.raises(tensorfile.TensorFileError):
            tensorfile.loads(bad)


def test_a_hand_written_header_cannot_name_anything_but_data():
    def forged(state_json: str, index: dict | None = None) -> bytes:
        index = index or {}
        metadata = {"format": tensorfile.FORMAT, "version": tensorfile.VERSION, "state": state_json}
        metadata["sha256"] = tensorfile._digest(index, state_json, b"")
        header = json.dumps(index | {"__metadata__": metadata}).encode()
        return len(header).to_bytes(8, "little") + header

    assert tensorfile.loads(forged('{"params": [1, 2], "config": {}}')) == {"params": [1, 2], "config": {}}
    for hostile in ['{"$call": "os.system"}', '{"$tensor": "missing"}', '{"$tuple": 5}', '{"$dict": [[[1], 2]]}']:
        with pytest.raises(tensorfile.TensorFileError):
            tensorfile.loads(forged(hostile))
    # sizes whose product wraps round to 0 in int64 (no bytes needed, 2**64 elements allocated), or
    # that are no sizes: refused before any tensor is made
    for shape in [[2**32, 2**32], [0, 2**64], [2**62, 2**62, 0], [-1, -2], [1.5], "12", [True]]:
        entry = {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}
        with pytest.raises(tensorfile.TensorFileError, match="tensor 't'"):
            tensorfile.loads(forged('{"params": {"$tensor": "t"}}', {"t": entry}))


def test_a_checkpoint_of_parameters_training_never_writes_is_refused(tmp_path):
    for params, what in [
        (torch.zeros(3, dtype=torch.bfloat16), "params are torch.bfloat16"),
        (torch.zeros(2, 2), "flat"),
    ]:
        (tmp_path / "odd.pt").write_bytes(tensorfile.dumps({"params": params, "config": Config().to_dict()}))
        with pytest.raises(CheckpointError, match=what):
            read_checkpoint(tmp_path / "odd.pt")


@pytest.fixture
def crafted(tmp_path):
    """A legacy-format checkpoint with a valid envelope and checksum whose payload opens a marker
    file when unpickled, inside a run folder as a run would leave it; returns (file, marker)."""
    marker = tmp_path / "PWNED"
    state = {"params": torch.zeros(3), "step": 10, "config": Config().to_dict(), "x": OpensAFile(marker)}
    checkpoint = tmp_path / "logs" / "victim" / "checkpoints" / step_name(10)
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(legacy_checkpoint(state))
    envelope = torch.load(io.BytesIO(checkpoint.read_bytes()), weights_only=False)
    torch.load(io.BytesIO(envelope["payload"]), weights_only=False)  # read as distmeta 0.1 did, the file ...
    assert marker.exists()
    marker.unlink()  # ... opens the marker
    return checkpoint, marker


def test_a_crafted_checkpoint_is_refused_by_every_reader_and_its_payload_never_runs(crafted, cli_env):
    checkpoint, marker = crafted
    logdir = checkpoint.parent.parent.parent
    commands = {
        "distmeta evaluate": ["-m", "distmeta", "evaluate", "--checkpoint", str(checkpoint)],
        "--eval-only": ["launch.py", "--eval-only", "--checkpoint", str(checkpoint)],
        "--resume FILE": ["launch.py", "--resume", str(checkpoint), "--logdir", str(logdir)],
        "--resume latest": ["launch.py", "--resume", "latest", "--logdir", str(logdir)],
        "checkpoint convert": ["-m", "distmeta", "checkpoint", "convert", str(checkpoint)],
        "checkpoint show": ["-m", "distmeta", "checkpoint", "show", str(checkpoint)],
        "checkpoint export": ["-m", "distmeta", "checkpoint", "export", str(checkpoint), "--out", str(logdir / "x.pt")],
    }
    for what, args in commands.items():
        out = subprocess.run(
            [sys.executable, *args], cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 2, f"{what}: exit {out.returncode}\n{out.stdout}\n{out.stderr}"
        assert "Traceback" not in out.stderr, f"{what}:\n{out.stderr}"
        assert not marker.exists(), f"{what} ran the checkpoint's payload"
        expected = "is not converted" if what == "checkpoint convert" else "pickle-based format"
        assert expected in out.stderr, f"{what}:\n{out.stderr}"
        if what != "checkpoint convert":
            assert "distmeta checkpoint convert" in out.stderr, f"{what}: the fix is not named\n{out.stderr}"
    assert checkpoint.read_bytes().startswith(b"PK")  # refused files are left as they were


def test_the_server_and_the_store_skip_a_crafted_checkpoint_without_running_it(crafted, caplog):
    checkpoint, marker = crafted
    store = CheckpointStore(checkpoint.parent)
    assert store.latest() is None  # the only checkpoint is refused, with a warning naming it
    assert "pickle-based format" in caplog.text and step_name(10) in caplog.text
    with pytest.raises(CheckpointError, match="distmeta checkpoint convert"):
        read_checkpoint(checkpoint)
    assert not marker.exists()


def test_a_checkpoint_of_the_earlier_format_converts_in_one_command_with_nothing_lost(tmp_path, cli_env):
    state = server_like_state()
    old = tmp_path / "checkpoints" / step_name(7)
    old.parent.mkdir()
    old.write_bytes(legacy_checkpoint(state))
    with pytest.raises(CheckpointError, match=f"distmeta checkpoint convert {old}"):
        read_checkpoint(old)
    out = subprocess.run(
        [sys.executable, "-m", "distmeta", "checkpoint", "convert", str(old)],
        cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert_same(dict(state, validation={"mean": float("nan"), "row": {"steps": 1, "ci95": 0.5}}), read_checkpoint(old))
    assert Path(f"{old}.pickle").read_bytes() == legacy_checkpoint(state)  # the original is kept beside it
    assert CheckpointStore(old.parent).latest()[0] == step_name(7)  # and the run resumes from the converted one
    with pytest.raises(CheckpointError, match="not a checkpoint of the earlier"):
        convert_legacy(old)  # converting twice is refused, not a second backup over the first


def crafted_shards(out: Path, marker: Path) -> None:
    """Shards whose Arrow schema claims the pickle-based ``arrow.py_extension_type`` (pyarrow
    before 14.0.1 unpickled its metadata on read), with a manifest whose SHA-256s match, as an
    attacker who ships both would write them."""
    out.mkdir()
    images = pa.FixedSizeBinaryArray.from_buffers(pa.binary(4), 2, [None, pa.py_buffer(bytes(8))])
    field = pa.field(
        "image",
        pa.binary(4),
        metadata={
            b"ARROW:extension:name": b"arrow.py_extension_type",
            b"ARROW:extension:metadata": pickled(OpensAFile(marker)),
        },
    )
    columns = [images, pa.array([0, 0], pa.int32()), pa.array(["a", "a"]), pa.array(["g", "g"])]
    fields = [field, pa.field("label", pa.int32()), pa.field("class_name", pa.string()), pa.field("group", pa.string())]
    batch = pa.record_batch(columns, schema=pa.schema(fields))
    with pa.OSFile(str(out / "shard-00000.arrow"), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    data = (out / "shard-00000.arrow").read_bytes()
    shard = {"file": "shard-00000.arrow", "rows": 2, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    classes = [{"name": "a", "group": "g", "shard": 0, "first_row": 0, "rows": 2}]
    manifest = {"format": "distmeta-shards", "version": 1, "image_shape": [1, 2, 2], "classes": classes}
    (out / MANIFEST).write_text(json.dumps(manifest | {"splits": {"train": [0]}, "shards": [shard]}))


def test_crafted_shards_and_manifest_run_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    crafted_shards(tmp_path / "shards", marker)
    dataset = ShardedDataset(tmp_path / "shards")  # the extension's metadata stays bytes: plain binary images
    assert dataset.gather(0, np.array([0, 1])).shape == (2, 1, 2, 2)
    assert not marker.exists()
    manifest = json.loads((tmp_path / "shards" / MANIFEST).read_text())
    (tmp_path / "shards" / MANIFEST).write_text(json.dumps(manifest | {"image_shape": [1, 2, 3]}))
    with pytest.raises(ShardError, match="schema"):  # a manifest that lies about the data is caught
        ShardedDataset(tmp_path / "shards")


def test_a_config_cannot_construct_python_objects(tmp_path):
    marker = tmp_path / "PWNED"
    config = tmp_path / "hostile.yaml"
    config.write_text(f"train:\n  steps: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="hostile.yaml"):
        load_config(config, [])
    with pytest.raises(ConfigError):
        load_config(None, [f"train.steps=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()
