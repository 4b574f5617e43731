"""`distmeta data build folder`: class-per-folder datasets, both layouts, RGB and grayscale."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from distmeta.config import load_config
from distmeta.data.folder import build_folder
from distmeta.data.shards import ShardedDataset, ShardError
from distmeta.tasks import build_source, task_rng


def make_class(folder, seed, count=6, size=(40, 30), mode="RGB"):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
            folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}"
        )


def test_split_folders_become_splits_and_images_are_resized(tmp_path):
    for split, classes in (("train", 6), ("val", 2), ("test", 3)):
        for c in range(classes):
            make_class(tmp_path / "src" / split / f"n{split}{c}", seed=hash((split, c)) % 1000)
    build_folder(tmp_path / "src", tmp_path / "out", image_size=16, progress=lambda m: None)
    data = ShardedDataset(tmp_path / "out")
    assert data.image_shape == (3, 16, 16)
    assert {name: len(m) for name, m in data.splits.items()} == {
        "default/train": 6,
        "default/val": 2,
        "default/test": 3,
    }
    first = data.classes[0]
    original = Image.open(tmp_path / "src" / "train" / "ntrain0" / "000.jpg").convert("RGB")
    expected = np.asarray(original.resize((16, 16), Image.Resampling.LANCZOS)).transpose(2, 0, 1)
    np.testing.assert_array_equal(data.images(first["shard"])[first["first_row"]], expected)
    assert data.manifest["inverted"] is False  # stored as decoded (Omniglot's alone are inverted)
    cfg = load_config(
        None,
        [
            "task.source=shards",
            "model.name=conv4",
            f"task.shards={tmp_path / 'out'}",
            "task.split_scheme=default",
            "task.ways=3",
            "task.shots=1",
            "task.queries=2",
            "task.rotations=false",
        ],
    )
    batch = build_source(cfg.task).sample(task_rng(0, "test", 0), 4, "test", 1, 2)
    assert batch.support_x.shape == (4, 3, 3, 16, 16)


def test_a_split_file_and_grayscale_detection(tmp_path):
    for c in range(4):
        make_class(tmp_path / "src" / f"class{c}", seed=c, mode="L")
    (tmp_path / "src" / "class0" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden files are no images
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": ["class0", "class1"], "val": ["class2"], "test": ["class3"]}))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "distmeta",
            "data",
            "build",
            "folder",
            "--src",
            str(tmp_path / "src"),
            "--out",
            str(tmp_path / "out"),
            "--image-size",
            "12",
            "--splits",
            str(splits),
            "--invert",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    data = ShardedDataset(tmp_path / "out")
    assert data.image_shape == (1, 12, 12)
    assert [data.classes[i]["name"] for i in data.split("default/train")] == ["class0", "class1"]
    assert data.classes[0]["rows"] == 6
    # --invert stores 255 - pixel (dark drawings on light made bright on dark, as Omniglot's shards are)
    original = Image.open(tmp_path / "src" / "class0" / "000.jpg").convert("L")
    expected = 255 - np.asarray(original.resize((12, 12), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(data.images(data.classes[0]["shard"])[data.classes[0]["first_row"]][0], expected)
    assert data.manifest["inverted"] is True


def test_bad_folder_datasets_are_named(tmp_path):
    with pytest.raises(ShardError, match="has no train/ val/ test/ folders"):
        build_folder(tmp_path, tmp_path / "out", 8, progress=lambda m: None)
    make_class(tmp_path / "src" / "a", seed=0)
    (tmp_path / "src" / "a" / "labels.csv").write_text("not,an,image")
    (tmp_path / "split.json").write_text(json.dumps({"train": ["a"], "test": ["b"]}))
    with pytest.raises(ShardError, match="lists class 'b'"):
        build_folder(tmp_path / "src", tmp_path / "out", 8, tmp_path / "split.json", progress=lambda m: None)
    (tmp_path / "split.json").write_text(json.dumps({"train": ["a"]}))
    with pytest.raises(ShardError, match="labels.csv is not an image in a format distmeta reads"):
        build_folder(tmp_path / "src", tmp_path / "out", 8, tmp_path / "split.json", progress=lambda m: None)
    (tmp_path / "split.json").write_text(json.dumps({"training": ["a"]}))
    with pytest.raises(ShardError, match=r"names splits \['training'\]"):
        build_folder(tmp_path / "src", tmp_path / "out", 8, tmp_path / "split.json", progress=lambda m: None)
    make_class(tmp_path / "src" / "g", seed=1, mode="L")  # grayscale: the channel count is read from every file
    (tmp_path / "src" / "g" / "notes.txt").write_text("not an image")
    (tmp_path / "split.json").write_text(json.dumps({"train": ["g"]}))
    with pytest.raises(ShardError, match="notes.txt is not an image in a format distmeta reads"):
        build_folder(tmp_path / "src", tmp_path / "out", 8, tmp_path / "split.json", progress=lambda m: None)
    for twice in ({"train": ["a", "g"], "test": ["g"]}, {"train": ["a", "g/"], "test": ["./g"]}):
        (tmp_path / "split.json").write_text(json.dumps(twice))  # the same folder, however it is written
        with pytest.raises(ShardError, match="lists the class\\(es\\) g more than once"):
            build_folder(tmp_path / "src", tmp_path / "out", 8, tmp_path / "split.json", progress=lambda m: None)
    (tmp_path / "outside").mkdir()
    (tmp_path / "split.json").write_text(json.dumps({"train": ["a", "../outside"]}))
    with pytest.raises(ShardError, match=r"lists class '../outside', which is outside --src"):
        build_folder(tmp_path / "src", tmp_path / "out", 8, tmp_path / "split.json", progress=lambda m: None)
    for malformed in (["a", "g"], {"train": "a"}):
        (tmp_path / "split.json").write_text(json.dumps(malformed))
        with pytest.raises(ShardError, match="must be a JSON object of class-name lists"):
            build_folder(tmp_path / "src", tmp_path / "out", 8, tmp_path / "split.json", progress=lambda m: None)


def test_16_bit_grayscale_images_keep_their_tones(tmp_path):
    """A 16-bit PNG (Pillow's I;16) scaled to 8 bits, not clipped at 255 (which made every pixel
    above 1/256 of full scale white)."""
    tones = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040  # 0 .. 65520
    for name in ("a", "b"):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(tones[::-1] if i else tones).save(tmp_path / "src" / name / f"{i}.png")
    (tmp_path / "split.json").write_text(json.dumps({"train": ["a"], "test": ["b"]}))
    build_folder(tmp_path / "src", tmp_path / "out", 8, tmp_path / "split.json", progress=lambda m: None)
    data = ShardedDataset(tmp_path / "out")
    assert data.image_shape == (1, 8, 8)  # grayscale, found from the files
    stored = data.images(data.classes[0]["shard"])[data.classes[0]["first_row"]][0]
    np.testing.assert_array_equal(stored, np.rint(tones / 257).astype(np.uint8))


def test_a_dataset_is_never_rebuilt_in_place_and_a_failed_build_leaves_no_shards(tmp_path, cli_env):
    """Building over existing shards would destroy what runs read (and the fingerprint their
    checkpoints record): refused before any work, the dataset untouched. A build that fails part way
    removes the shards it wrote, so nothing half-built passes for a dataset."""
    from distmeta.data.shards import ClassImages, write_shards

    for c in range(3):
        make_class(tmp_path / "src" / "train" / f"c{c}", seed=c)
    for split in ("val", "test"):
        make_class(tmp_path / "src" / split / f"{split}0", seed=9)
    build_folder(tmp_path / "src", tmp_path / "out", 8, progress=lambda m: None)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    command = [sys.executable, "-m", "distmeta", "data", "build", "folder", "--src", str(tmp_path / "src")]
    command += ["--out", str(tmp_path / "out"), "--image-size", "12"]
    again = subprocess.run(command, capture_output=True, text=True, env=cli_env, timeout=120)
    assert again.returncode == 2, again.stderr
    assert "already holds shards (manifest.json, shard-00000.arrow): nothing is overwritten" in again.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before

    with pytest.raises(ShardError, match="--image-size 0: give the side"):
        build_folder(tmp_path / "src", tmp_path / "zero", 0, progress=lambda m: None)
    make_class(tmp_path / "src" / "train" / "c0" / "more", seed=5)  # images a class-per-folder build cannot see
    with pytest.raises(ShardError, match=r"class folder .*c0 holds folder\(s\) more: a class's images sit directly"):
        build_folder(tmp_path / "src", tmp_path / "nested", 8, progress=lambda m: None)

    def classes():
        for c in range(3):
            yield ClassImages(f"c{c}", "train", np.zeros((4, 1, 8, 8), np.uint8))
        raise ShardError("image 7 of class c3 does not decode")

    with pytest.raises(ShardError, match="c3 does not decode"):
        write_shards(tmp_path / "partial", classes(), {"default/train": [0, 1, 2]}, shard_bytes=300)
    assert list((tmp_path / "partial").iterdir()) == []  # two shards were written, then removed


def test_what_would_silently_change_a_dataset_is_refused_and_a_file_never_runs(tmp_path):
    """A class in two splits (tested on what it trained on), a broken link where an image was meant,
    float pixels of unknown range, and a PostScript file dressed as a JPEG (Pillow would hand it to
    Ghostscript, an interpreter): each stops the build, named. The first colour image is named as
    the reason the shards are RGB."""
    for split, name in (("train", "cat"), ("train", "dog"), ("val", "owl"), ("test", "Cat")):
        make_class(tmp_path / "src" / split / name, seed=len(name), mode="L")
    with pytest.raises(ShardError, match=r"class\(es\) cat are in more than one of train/ val/ test/"):
        build_folder(tmp_path / "src", tmp_path / "out", 8, progress=lambda m: None)
    (tmp_path / "src" / "test" / "Cat").rename(tmp_path / "src" / "test" / "eel")
    (tmp_path / "src" / "test" / "fox").symlink_to(tmp_path / "src" / "train" / "dog")  # the same class, linked
    with pytest.raises(ShardError, match="are in more than one of train/ val/ test/"):
        build_folder(tmp_path / "src", tmp_path / "out", 8, progress=lambda m: None)
    (tmp_path / "src" / "test" / "fox").unlink()

    broken = tmp_path / "src" / "train" / "dog" / "999.png"
    broken.symlink_to(tmp_path / "gone.png")
    with pytest.raises(ShardError, match=r"dog holds 999.png, which are not files \(a broken link\?\)"):
        build_folder(tmp_path / "src", tmp_path / "out", 8, progress=lambda m: None)
    broken.unlink()

    Image.fromarray(np.full((6, 6), 0.5, np.float32), "F").save(tmp_path / "src" / "val" / "owl" / "f.tif")
    with pytest.raises(ShardError, match="f.tif cannot be converted .*32-bit floats"):
        build_folder(tmp_path / "src", tmp_path / "out", 8, channels=1, progress=lambda m: None)
    (tmp_path / "src" / "val" / "owl" / "f.tif").unlink()

    postscript = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n(pwned) print\n"
    (tmp_path / "src" / "train" / "cat" / "evil.jpg").write_bytes(postscript)
    for channels in (None, 1):  # read by the header scan, and by the decoder
        with pytest.raises(ShardError, match="evil.jpg is not an image in a format distmeta reads"):
            build_folder(tmp_path / "src", tmp_path / "out", 8, channels=channels, progress=lambda m: None)
    (tmp_path / "src" / "train" / "cat" / "evil.jpg").unlink()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

    gray_gif = Image.fromarray(np.arange(36, dtype=np.uint8).reshape(6, 6) * 7, "L").convert("P")
    gray_gif.save(tmp_path / "src" / "val" / "owl" / "gray.gif")  # a palette of grays: still grayscale
    build_folder(tmp_path / "src", tmp_path / "gray", 8, progress=lambda m: None)
    assert ShardedDataset(tmp_path / "gray").image_shape == (1, 8, 8)
    Image.new("RGB", (5, 5), "red").save(tmp_path / "src" / "val" / "owl" / "red.png")
    said = []
    build_folder(tmp_path / "src", tmp_path / "out", 8, progress=said.append)
    assert said[0].endswith(
        f"3 channel(s) ({tmp_path / 'src' / 'val' / 'owl' / 'red.png'} is in colour; "
        "--channels 1 stores all as grayscale)"
    ), said[0]


def test_a_build_stopped_by_sigterm_removes_the_shards_it_wrote(tmp_path, cli_env):
    """A timeout, a scheduler's preemption or `docker stop` sends SIGTERM: the build unwinds as on
    Ctrl-C and removes its shards, instead of leaving some to pass for a dataset."""
    import os
    import signal
    import textwrap
    import time

    for split, classes in (("train", 30), ("val", 2), ("test", 2)):
        for c in range(classes):
            make_class(tmp_path / "src" / split / f"{split}{c}", seed=c, count=2, size=(8, 8))
    script = textwrap.dedent(f"""
        import functools, time
        import distmeta.data.folder as folder
        from distmeta.cli import main
        from distmeta.data.shards import write_shards
        slow = folder.dataset_image
        folder.dataset_image = lambda *a: (time.sleep(0.1), slow(*a))[1]  # a big dataset, in miniature
        folder.write_shards = functools.partial(write_shards, shard_bytes=100)  # a shard per class
        raise SystemExit(main(["data", "build", "folder", "--src", {str(tmp_path / "src")!r},
                               "--out", {str(tmp_path / "out")!r}, "--image-size", "4"]))
    """)
    build = subprocess.Popen([sys.executable, "-c", script], env=cli_env, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(list((tmp_path / "out").glob("shard-*.arrow"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    assert build.poll() is None, "the build ended before it could be stopped"
    os.kill(build.pid, signal.SIGTERM)
    assert build.wait(timeout=60) == 128 + signal.SIGTERM
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # no shard, no manifest
