"""Omniglot ingest from the official zips, the shard format, and episodes read from the shards."""

import hashlib
import io
import json
import shutil
import signal
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from distmeta.config import load_config
from distmeta.data.shards import ClassImages, ShardedDataset, ShardError, write_shards
from distmeta.tasks import build_source, task_rng
from distmeta.tasks.episodes import distinct_choices


def episodes(shards, *overrides):
    cfg = load_config(None, ["task.source=shards", "model.name=conv4", f"task.shards={shards}", *overrides])
    return build_source(cfg.task)


def test_ingest_writes_all_of_omniglot_with_its_splits(omniglot_shards):
    data = ShardedDataset(omniglot_shards)
    assert len(data.classes) == 1623 and all(c["rows"] == 20 for c in data.classes)
    assert data.image_shape == (1, 28, 28)
    sizes = {name: len(members) for name, members in data.splits.items()}
    assert sizes == {
        **{"maml/train": 1100, "maml/val": 100, "maml/test": 423},
        **{"vinyals/train": 1028, "vinyals/val": 172, "vinyals/test": 423},
        **{"lake/train": 964, "lake/test": 659},
    }
    for scheme in ("maml", "vinyals"):
        train, val, test = (set(data.split(f"{scheme}/{s}").tolist()) for s in ("train", "val", "test"))
        assert not (train & val or train & test or val & test) and len(train | val | test) == 1623
    assert len({c["group"] for c in data.classes}) == 50  # alphabets
    # Vinyals: validation is five whole background alphabets, test the evaluation set's last 423 characters
    names = {s: [data.classes[i]["name"] for i in data.split(f"vinyals/{s}")] for s in ("val", "test")}
    assert {n.split("/")[0] for n in names["val"]} == {
        *("Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)")
    }
    assert min(names["test"]) == "Gurmukhi/character42" and max(names["test"]) == "ULOG/character26"
    assert "Gurmukhi/character41" in [c["name"] for c in data.classes]
    assert set(data.split("vinyals/test")) <= set(data.split("lake/test"))
    manifest = json.loads((omniglot_shards / "manifest.json").read_text())
    assert manifest["schema"] == {
        "image": "fixed_size_binary[784]",
        "label": "int32",
        "class_name": "string",
        "group": "string",
    }
    assert manifest["inverted"] is True  # strokes bright: what `distmeta adapt` does to a user's drawings too


def test_images_are_antialiased_28x28_with_bright_strokes(omniglot_src, omniglot_shards):
    data = ShardedDataset(omniglot_shards)
    (index,) = [i for i, c in enumerate(data.classes) if c["name"] == "Alphabet_of_the_Magi/character01"]
    stored = data.images(data.classes[index]["shard"])[data.classes[index]["first_row"]]
    with zipfile.ZipFile(omniglot_src / "images_background.zip") as z:
        png = z.read("images_background/Alphabet_of_the_Magi/character01/0709_01.png")
    original = Image.open(io.BytesIO(png)).convert("L")  # 105x105, white background, black strokes
    expected = 255 - np.asarray(original.resize((28, 28), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(stored[0], expected)
    assert stored.mean() < 80 and stored.max() == 255  # dark background, bright strokes
    assert len(np.unique(stored)) > 10  # antialiased: grey levels, not a 1-bit image
    assert not stored.flags.writeable  # a view into the memory-mapped shard


def _class_of(data, image):
    """Match an image (or one of its rotations) to its (class, rotation) by its bytes."""
    table = data.images(0).reshape(len(data.images(0)), -1)
    for k in range(4):
        hits = np.flatnonzero((table == np.rot90(image, -k, axes=(-2, -1)).reshape(-1)).all(axis=1))
        if len(hits):
            (row,) = hits[:1]
            return next(i for i, c in enumerate(data.classes) if c["first_row"] <= row < c["first_row"] + c["rows"]), k
    raise AssertionError("image not found in the shards")


@pytest.mark.parametrize("split", ["test", "train"])
def test_episodes_are_n_way_k_shot_with_distinct_classes_and_permuted_labels(omniglot_shards, split):
    source = episodes(omniglot_shards, "task.ways=5", "task.shots=2", "task.queries=3")
    batch = source.sample(task_rng(0, split, 1), 6, split, 2, 3)
    assert batch.support_x.shape == (6, 10, 1, 28, 28) and batch.query_x.shape == (6, 15, 1, 28, 28)
    pool = set(source.pool(split).tolist())
    rotations = set()
    for t in range(6):
        assert sorted(batch.support_y[t].tolist()) == sorted(list(range(5)) * 2)
        identity = {}
        for x, y in [*zip(batch.support_x[t], batch.support_y[t]), *zip(batch.query_x[t], batch.query_y[t])]:
            cls, k = _class_of(source.data, x)
            assert cls in pool
            identity.setdefault(int(y), (cls, k))
            assert identity[int(y)] == (cls, k)  # one label, one (class, rotation)
            rotations.add(k)
        assert len(set(identity.values())) == 5  # no class repeats within an episode
    assert rotations == {0} if split == "test" else len(rotations) > 1  # rotations are training classes only


def test_episodes_are_deterministic_and_copies(omniglot_shards):
    source = episodes(omniglot_shards)
    a = source.sample(task_rng(3, "train", 7), 4, "train", 1, 15)
    b = source.sample(task_rng(3, "train", 7), 4, "train", 1, 15)
    assert np.array_equal(a.query_x, b.query_x) and a.query_x.flags.writeable


def test_distinct_choices_are_uniform_k_subsets_in_random_order():
    rng = np.random.default_rng(0)
    picks = distinct_choices(rng, 20000, 3, 10)
    assert all(len(set(row)) == 3 for row in picks)
    counts = np.bincount(picks[:, 0], minlength=10)  # the first label is uniform over the classes
    assert counts.min() > 1800 and counts.max() < 2200


def test_many_ways_of_a_few_times_more_classes_are_drawn_at_once():
    """200 of 1,028 classes: a row drawn with replacement has no repeat with chance 1e-9, so
    redrawing such rows until none repeats would never end."""

    def hung(signum, frame):
        raise TimeoutError("distinct_choices(200 of 1,028) still redrawing after 30 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        picks = distinct_choices(np.random.default_rng(0), 8, 200, 1028)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert picks.shape == (8, 200) and all(len(set(row)) == 200 for row in picks) and picks.max() < 1028


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task.ways=5000"], "task.ways=5000 but split 'train' has only 4400 classes"),
        (["task.rotations=false", "task.ways=1101"], "split 'train' has only 1100 classes"),
        (["task.shots=10", "task.queries=15"], "has 20 images, fewer than task.shots \\+ task.queries = 10 \\+ 15"),
        (["task.split_scheme=cbfinn"], "split 'cbfinn/train' is not in"),
    ],
)
def test_impossible_episodes_are_named_before_training(omniglot_shards, overrides, message):
    from distmeta.runtime.local import LocalLoop
    from distmeta.train import _checked_source

    cfg = load_config(None, ["task.source=shards", "model.name=conv4", f"task.shards={omniglot_shards}", *overrides])
    with pytest.raises(ShardError, match=message):
        _checked_source(cfg)
    with pytest.raises(ShardError, match=message):  # the compute core without Ray checks alike
        LocalLoop(cfg)


def test_damaged_shards_are_caught(omniglot_shards, tmp_path):
    def copy():
        target = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(omniglot_shards, target)
        return target

    with pytest.raises(ShardError, match="manifest.json does not exist: build shards"):
        ShardedDataset(tmp_path / "nothing")
    missing = copy()
    (missing / "shard-00000.arrow").unlink()
    with pytest.raises(ShardError, match="shard-00000.arrow is missing"):
        ShardedDataset(missing)
    truncated = copy()
    with open(truncated / "shard-00000.arrow", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ShardError, match="truncated"):
        ShardedDataset(truncated)
    corrupted = copy()
    with open(corrupted / "shard-00000.arrow", "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ShardError, match="does not match its SHA-256"):
        ShardedDataset(corrupted)
    old = copy()
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["version"] = 99
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="version 99; this distmeta reads"):
        ShardedDataset(old)


def test_crafted_manifests_and_compressed_shards_are_named(tmp_path):
    rng = np.random.default_rng(0)
    classes = [ClassImages(f"c{i}", "g", rng.integers(0, 256, (3, 1, 4, 4), dtype=np.uint8)) for i in range(4)]
    write_shards(tmp_path / "good", classes, {"s/train": [0, 1], "s/test": [2, 3], "other/train": [0, 2]})
    assert len(ShardedDataset(tmp_path / "good").classes) == 4  # schemes may reuse classes; splits of one may not

    def edited(name, **changes):
        target = tmp_path / name
        shutil.copytree(tmp_path / "good", target)
        manifest = json.loads((target / "manifest.json").read_text()) | changes
        (target / "manifest.json").write_text(json.dumps(manifest))
        return target

    cases = [
        ({"splits": {"s/train": [0, 1], "s/test": [1, 3]}}, r"'s/test' and 's/train' share the class\(es\) \[1\]"),
        ({"splits": {"s/train": [0, 1, 0]}}, r"splits\['s/train'\] lists a class more than once"),
        ({"image_shape": [1, 2**32, 2**32]}, "more than an Arrow row holds"),  # its product wrapped to 0 in int64
    ]
    for i, (changes, message) in enumerate(cases):
        with pytest.raises(ShardError, match=message):
            ShardedDataset(edited(f"case{i}", **changes))

    # another Arrow writer's compressed file: its rows are decompressed elsewhere, not read from the file
    compressed = edited("compressed")
    path = compressed / "shard-00000.arrow"
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    manifest = json.loads((compressed / "manifest.json").read_text())
    manifest["shards"][0] |= {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (compressed / "manifest.json").write_text(json.dumps(manifest))
    for map_bytes in (1 << 20, 0):  # mapped whole, or read row by row
        with pytest.raises(ShardError, match="is a compressed Arrow file; rebuild it"):
            ShardedDataset(compressed, map_bytes=map_bytes)


def test_bad_sources_are_named(tmp_path):
    from distmeta.data.omniglot import build_omniglot

    with pytest.raises(ShardError, match="must hold the official Omniglot zips"):
        build_omniglot(tmp_path, tmp_path / "out", progress=lambda m: None)
    character = tmp_path / "images_background" / "Alphabet" / "character01"
    character.mkdir(parents=True)
    (character / "notes.txt").write_text("not an image")
    with pytest.raises(ShardError, match="notes.txt is not an image"):
        build_omniglot(tmp_path, tmp_path / "out", progress=lambda m: None)


def test_which_drawings_become_support_is_uniform(omniglot_shards):
    source = episodes(omniglot_shards, "task.rotations=false")
    batch = source.sample(task_rng(0, "test", 0), 400, "test", 1, 15)
    data = source.data.images(0).reshape(len(source.data.images(0)), -1)
    lookup = {data[r].tobytes(): r for r in range(len(data))}
    drawer = [(lookup[x.reshape(-1).tobytes()] % 20) for x in batch.support_x.reshape(-1, 784)]
    counts = np.bincount(drawer, minlength=20)  # 2,000 support images over the 20 drawings of a class
    assert counts.min() > 60 and counts.max() < 140


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_part_of_a_batch_is_exactly_those_tasks_of_the_whole(omniglot_shards, split):
    source = episodes(omniglot_shards)
    whole = source.sample(task_rng(0, split, 3), 9, split, 1, 5)
    part = source.sample(task_rng(0, split, 3), 9, split, 1, 5, slice(3, 7))
    for name in ("support_x", "support_y", "query_x", "query_y"):
        np.testing.assert_array_equal(getattr(part, name), getattr(whole, name)[3:7])


def test_a_scheme_without_validation_can_train_only_without_validation(omniglot_shards, tmp_path):
    from distmeta.config import ConfigError
    from distmeta.train import train

    assert episodes(omniglot_shards, "task.split_scheme=lake").splits == ("train", "test")
    cfg = load_config(
        None, ["task.source=shards", "model.name=conv4", f"task.shards={omniglot_shards}", "task.split_scheme=lake"]
    )
    with pytest.raises(ConfigError, match="has no val split .* set train.eval_every=0"):
        train(cfg, tmp_path / "run")  # fails before Ray starts


def test_training_with_the_validation_classes_draws_them_and_leaves_nothing_to_validate(omniglot_shards):
    """task.train_with_val: Prototypical Networks' final models train on the Vinyals split's training
    and validation characters, 1,200 with rotations, "4,800 classes in total" (Snell et al., 2017)."""
    from distmeta.assemble import check_run
    from distmeta.config import ConfigError
    from distmeta.runtime.local import LocalLoop

    options = ["task.split_scheme=vinyals", "task.rotations=true", "task.labels=class", "algorithm.name=baseline"]
    alone = episodes(omniglot_shards, *options)
    source = episodes(omniglot_shards, *options, "task.train_with_val=true")
    data = source.data
    train, val, test = (set(data.split(f"vinyals/{s}").tolist()) for s in ("train", "val", "test"))
    assert (len(train), len(val), alone.spec.output_dim, source.spec.output_dim) == (1028, 172, 4112, 4800)
    assert set(source.pool("train").tolist()) == train | val and source.splits == ("train", "test")
    batch = source.sample(task_rng(0, "train", 0), 40, "train", 1, 1)
    pool, labels = source.pool("train"), batch.support_y.reshape(-1)
    # a label is a (class, rotation) among the 4,800: its class is the pool's (label mod 1,200)-th
    for image, label in list(zip(batch.support_x[:, :, 0].reshape(-1, 28, 28), labels))[:20]:
        assert _class_of(data, image)[0] == pool[int(label) % 1200]
    drawn = set(pool[labels % 1200].tolist())
    assert drawn & val and drawn & train and not drawn & test
    with pytest.raises(ConfigError, match="no validation split"):
        source.pool("val")
    with pytest.raises(ConfigError, match="no lake/val split"):
        episodes(omniglot_shards, "task.split_scheme=lake", "task.train_with_val=true")

    base = ["task.source=shards", "model.name=conv4", f"task.shards={omniglot_shards}", *options]
    base += ["task.train_with_val=true", "task.ways=5", "task.shots=1", "task.queries=1", "train.meta_batch_size=2"]
    with pytest.raises(ConfigError, match="set train.eval_every=0"):
        check_run(load_config(None, base))
    with pytest.raises(ConfigError, match="sinusoid has no classes"):
        check_run(load_config(None, ["task.train_with_val=true", "train.eval_every=0"]))
    cfg = check_run(load_config(None, [*base, "train.eval_every=0", "train.steps=2"]))
    metrics = LocalLoop(cfg).run()  # a head over all 4,800 classes trains
    assert len(metrics) == 2 and all(
        m.train and np.isfinite(list(m.train.values())).all() and not m.rejected for m in metrics
    )


def _mapped_kib(path) -> int:
    """Resident KiB of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0]:  # a mapping's header line
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
def test_large_shards_are_read_without_mapping_them_into_memory(tmp_path):
    """Read every image of 48 MiB of shards in random batches. Mapped, the shard's pages become
    resident in this process; above the mapping limit they are read with pread and nothing of the
    file stays mapped, and the images are the same."""
    from distmeta.data.shards import ClassImages, write_shards

    rng = np.random.default_rng(0)
    classes = [ClassImages(f"c{i}", "g", rng.integers(0, 256, (20, 3, 64, 64), np.uint8)) for i in range(200)]
    write_shards(tmp_path, classes, {"all/train": list(range(200))})
    shard = tmp_path / "shard-00000.arrow"
    order = rng.permutation(4000).reshape(-1, 5, 8)
    peaks = {}
    for map_bytes in (64 << 20, 16 << 20):
        data = ShardedDataset(tmp_path, map_bytes=map_bytes)
        assert data.mapped == (map_bytes == 64 << 20)
        peak = 0
        for rows in order:
            images = data.gather(0, rows)
            assert images.shape == (5, 8, 3, 64, 64)
            np.testing.assert_array_equal(images[2, 3], classes[rows[2, 3] // 20].images[rows[2, 3] % 20])
            peak = max(peak, _mapped_kib(shard))
        peaks[map_bytes] = peak
        del data
    assert peaks[64 << 20] > 40 * 1024  # mapped: nearly the whole 48 MiB file became resident
    assert peaks[16 << 20] < 1024  # pread: only the IPC footer was ever touched through the mapping


def test_episodes_are_the_same_mapped_or_read_with_pread(omniglot_shards):
    mapped, read = episodes(omniglot_shards), episodes(omniglot_shards, "task.map_shards_mb=0")
    assert mapped.data.mapped and not read.data.mapped
    a = mapped.sample(task_rng(1, "train", 2), 8, "train", 1, 15)
    b = read.sample(task_rng(1, "train", 2), 8, "train", 1, 15)
    np.testing.assert_array_equal(a.support_x, b.support_x)
    np.testing.assert_array_equal(a.query_x, b.query_x)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval.queries=100"], r"has 20 images, fewer than eval shots \+ eval.queries = 1 \+ 100 .* split 'test'"),
        (["task.ways=500", "train.eval_every=0"], "task.ways=500 but split 'test' has only 423 classes"),
        (["task.ways=200", "eval.queries=5"], "task.ways=200 but split 'val' has only 100 classes"),
    ],
)
def test_impossible_evaluation_episodes_are_named_before_training(omniglot_shards, tmp_path, overrides, message):
    from distmeta.train import train

    cfg = load_config(
        None, ["task.source=shards", "model.name=conv4", f"task.shards={omniglot_shards}", "task.shots=1", *overrides]
    )
    with pytest.raises(ShardError, match=message):
        train(cfg, tmp_path / "run")  # before Ray starts: this test has no Ray


def test_a_run_whose_shards_moved_resumes_and_evaluates_at_the_new_path_if_the_data_is_the_same(
    ray_local, omniglot_shards, tmp_path, capsys
):
    from distmeta.checkpoint import read_checkpoint
    from distmeta.cli import launch_main, main
    from distmeta.config import ConfigError
    from distmeta.data.shards import dataset_fingerprint
    from distmeta.resume import prepare_resume
    from distmeta.train import train

    shutil.copytree(omniglot_shards, tmp_path / "data")
    tiny = ["model.filters=4", "task.ways=3", "task.shots=1", "task.queries=1", "train.meta_batch_size=2"]
    tiny += ["train.checkpoint_every=2", "train.eval_every=0", "eval.num_tasks=4", "eval.queries=1"]
    tiny += ["eval.inner_steps=[1]", "cluster.prefetch_batches=2", "cluster.num_workers=1", "cluster.cpus_per_worker=1"]
    cfg = load_config(
        None, ["task.source=shards", "model.name=conv4", f"task.shards={tmp_path / 'data'}", "train.steps=2", *tiny]
    )
    run_dir = train(cfg, tmp_path / "run").run_dir
    final = run_dir / "checkpoints" / "final.pt"
    assert read_checkpoint(final)["config"]["task"]["shards_fingerprint"] == dataset_fingerprint(omniglot_shards)
    (tmp_path / "data").rename(tmp_path / "moved")  # another mount point, another working directory
    moved = f"task.shards={tmp_path / 'moved'}"

    with pytest.raises(ConfigError, match="not at task.shards=.*data .* if they moved, pass task.shards=NEWPATH"):
        prepare_resume(str(run_dir), ["train.steps=4"], {})
    assert main(["evaluate", "--checkpoint", str(final)]) == 2
    assert "pass task.shards=NEWPATH" in capsys.readouterr().err

    other = tmp_path / "other"  # valid shards, other data: the same files, one test class fewer
    shutil.copytree(tmp_path / "moved", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["splits"]["maml/test"].pop()
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="not the data this run was trained on"):
        prepare_resume(str(run_dir), ["train.steps=4", f"task.shards={other}"], {})
    assert main(["evaluate", "--checkpoint", str(final), f"task.shards={other}"]) == 2
    assert "not the data this run was trained on" in capsys.readouterr().err

    assert main(["evaluate", "--checkpoint", str(final), moved]) == 0
    assert launch_main(["--eval-only", "--checkpoint", str(final), moved]) == 0
    assert "accuracy" in capsys.readouterr().out
    cfg, resumed = prepare_resume(str(run_dir), ["train.steps=4", moved], {})
    assert resumed == run_dir and cfg.task.shards == str(tmp_path / "moved")
    result = train(cfg, resumed, resume=True)
    assert read_checkpoint(result.checkpoint)["step"] == 4


def _break(manifest: dict, how: str) -> None:
    if how == "missing classes":
        del manifest["classes"]
    elif how == "shape as text":
        manifest["image_shape"] = "1x8x8"
    elif how == "rows as text":
        manifest["classes"][0]["rows"] = "4"
    elif how == "rows past the shard":
        manifest["classes"][-1]["rows"] += 1
    elif how == "shard out of range":
        manifest["classes"][0]["shard"] = 7
    elif how == "file outside the folder":
        manifest["shards"][0]["file"] = "../shard-00000.arrow"
    elif how == "split member out of range":
        manifest["splits"]["all/train"].append(99)


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing classes", "classes is missing"),
        ("shape as text", "image_shape must be list, got '1x8x8'"),
        ("rows as text", "classes\\[0\\].rows must be an integer, got '4'"),
        ("rows past the shard", "classes\\[2\\] \\(c2\\) holds rows 8..12 of shard 0, which has 12 rows"),
        ("shard out of range", "classes\\[0\\].shard is 7, but there are 1 shards"),
        ("file outside the folder", "shards\\[0\\].file must be a file name in the shards' folder, got '../shard"),
        ("split member out of range", "splits\\['all/train'\\] must be a list of class indices 0..2"),
    ],
)
def test_a_malformed_manifest_is_named_at_open_time(tmp_path, how, message):
    from distmeta.data.shards import ClassImages, write_shards

    rng = np.random.default_rng(0)
    write_shards(
        tmp_path,
        [ClassImages(f"c{i}", "g", rng.integers(0, 256, (4, 1, 8, 8), np.uint8)) for i in range(3)],
        {"all/train": [0, 1, 2]},
    )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    _break(manifest, how)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=f"manifest.json is malformed: {message}.*; rebuild the shards"):
        ShardedDataset(tmp_path)


def test_a_manifest_that_is_not_an_object_fails_with_exit_2(tmp_path, cli_env):
    import subprocess
    import sys

    (tmp_path / "manifest.json").write_text("[1, 2]")
    out = subprocess.run(
        [sys.executable, "launch.py", "task.source=shards", f"task.shards={tmp_path}", "model.name=conv4"],
        cwd=Path(__file__).resolve().parent.parent,
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "manifest.json holds a JSON list, not an object" in out.stderr, out.stderr[-2000:]
