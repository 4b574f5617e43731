"""Omniglot ingest from the official zips, the shard format, and episodes read from the shards."""

import io
import json
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from distmeta.config import load_config
from distmeta.data.shards import ShardedDataset, ShardError
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
    assert sizes == {"maml/train": 1100, "maml/val": 100, "maml/test": 423, "lake/train": 964, "lake/test": 659}
    maml = [set(data.split(f"maml/{s}").tolist()) for s in ("train", "val", "test")]
    assert not (maml[0] & maml[1] or maml[0] & maml[2] or maml[1] & maml[2])
    assert len({c["group"] for c in data.classes}) == 50  # alphabets
    manifest = json.loads((omniglot_shards / "manifest.json").read_text())
    assert manifest["schema"] == {
        "image": "fixed_size_binary[784]",
        "label": "int32",
        "class_name": "string",
        "group": "string",
    }


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
    pool = set(source.pools[split].tolist())
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


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task.ways=5000"], "task.ways=5000 but split 'train' has only 4400 classes"),
        (["task.rotations=false", "task.ways=1101"], "split 'train' has only 1100 classes"),
        (["task.shots=10", "task.queries=15"], "has 20 images, fewer than task.shots \\+ task.queries = 25"),
        (["task.split_scheme=vinyals"], "split 'vinyals/train' is not in"),
    ],
)
def test_impossible_episodes_are_named_before_training(omniglot_shards, overrides, message):
    with pytest.raises(ShardError, match=message):
        episodes(omniglot_shards, *overrides)


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


def test_bad_sources_are_named(tmp_path):
    from distmeta.data.omniglot import build_omniglot

    with pytest.raises(ShardError, match="must hold the official Omniglot zips"):
        build_omniglot(tmp_path, tmp_path / "out", progress=lambda m: None)
    character = tmp_path / "images_background" / "Alphabet" / "character01"
    character.mkdir(parents=True)
    (character / "notes.txt").write_text("not an image")
    with pytest.raises(ShardError, match="notes.txt is not an image Pillow can read"):
        build_omniglot(tmp_path, tmp_path / "out", progress=lambda m: None)


def test_which_drawings_become_support_is_uniform(omniglot_shards):
    source = episodes(omniglot_shards, "task.rotations=false")
    batch = source.sample(task_rng(0, "test", 0), 400, "test", 1, 15)
    data = source.data.images(0).reshape(len(source.data.images(0)), -1)
    lookup = {data[r].tobytes(): r for r in range(len(data))}
    drawer = [(lookup[x.reshape(-1).tobytes()] % 20) for x in batch.support_x.reshape(-1, 784)]
    counts = np.bincount(drawer, minlength=20)  # 2,000 support images over the 20 drawings of a class
    assert counts.min() > 60 and counts.max() < 140
