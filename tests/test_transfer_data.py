"""The cross-domain datasets (Fashion-MNIST and rendered glyphs, from Debian's packages) and
`distmeta evaluate --shards OTHER`: a checkpoint scored on another dataset's episodes."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distmeta.algorithms import build_learner
from distmeta.checkpoint import CheckpointStore, checkpoint_record
from distmeta.config import ImageFormat, load_config
from distmeta.data.fashion_mnist import CLASSES, build_fashion_mnist
from distmeta.data.glyphs import SCRIPTS, TEST_SCRIPTS, VAL_SCRIPTS, build_glyphs
from distmeta.data.shards import ShardedDataset, ShardError, dataset_fingerprint
from distmeta.evaluate import evaluate, on_other_data
from distmeta.params import flat_parameters
from distmeta.tasks import build_source

ROOT = Path(__file__).resolve().parent.parent


def idx_pixels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels straight from the gzipped IDX files, for comparison."""
    images = gzip.decompress((path / "t10k-images-idx3-ubyte.gz").read_bytes())[16:]
    labels = gzip.decompress((path / "t10k-labels-idx1-ubyte.gz").read_bytes())[8:]
    return np.frombuffer(images, np.uint8).reshape(-1, 28, 28), np.frombuffer(labels, np.uint8)


def test_fashion_mnist_shards_hold_the_files_pixels_per_class_and_split(fashion_mnist_src, tmp_path):
    build_fashion_mnist(fashion_mnist_src, tmp_path / "fashion", progress=lambda m: None)
    data = ShardedDataset(tmp_path / "fashion")
    assert data.image_shape == (1, 28, 28) and data.manifest["inverted"] is True  # the makers negated the photos
    names = [c["name"] for c in data.classes]
    assert names == [f"{split}/{name}" for split in ("train", "test") for name in CLASSES]
    assert [len(data.split(f"default/{s}")) for s in ("train", "test")] == [10, 10]
    assert {c["rows"] for c in data.classes[:10]} == {6000} and {c["rows"] for c in data.classes[10:]} == {1000}
    images, labels = idx_pixels(fashion_mnist_src)
    bag = data.classes[names.index("test/Bag")]
    stored = data.images(bag["shard"])[bag["first_row"] : bag["first_row"] + bag["rows"], 0]
    np.testing.assert_array_equal(stored, images[labels == CLASSES.index("Bag")])

    broken = tmp_path / "broken"
    shutil.copytree(fashion_mnist_src, broken)
    raw = gzip.decompress((broken / "t10k-images-idx3-ubyte.gz").read_bytes())
    (broken / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(ShardError, match="truncated"):
        build_fashion_mnist(broken, tmp_path / "out", progress=lambda m: None)
    with pytest.raises(ShardError, match="apt-get install dataset-fashion-mnist"):
        build_fashion_mnist(tmp_path / "nowhere", tmp_path / "out", progress=lambda m: None)


def test_glyphs_are_characters_of_unseen_scripts_split_by_script_and_reproducible(noto_fonts, tmp_path):
    fonts = tmp_path / "fonts"  # four scripts' fonts, so the build takes seconds
    fonts.mkdir()
    chosen = ("Thai", "Cherokee", "Deseret", "Ogham")
    for script in chosen:
        for family in SCRIPTS[script][0]:
            for path in noto_fonts.glob(f"{family}-*.ttf"):
                (fonts / path.name).symlink_to(path)
    build_glyphs(fonts, tmp_path / "a", progress=lambda m: None)
    data = ShardedDataset(tmp_path / "a")
    assert data.image_shape == (1, 28, 28) and data.manifest["inverted"] is True
    groups = {c["group"] for c in data.classes}
    assert groups == set(chosen)
    for c in data.classes:
        code = int(c["name"].split("U+")[1], 16)
        assert any(lo <= code <= hi for lo, hi in SCRIPTS[c["group"]][1]) and c["rows"] == 20
    for split in ("train", "val", "test"):
        scripts = {data.classes[i]["group"] for i in data.split(f"default/{split}")}
        expected = {s for s in chosen if (s in TEST_SCRIPTS, s in VAL_SCRIPTS) == (split == "test", split == "val")}
        assert scripts == expected, split
    thai = [c for c in data.classes if c["group"] == "Thai"]
    assert len(thai) > 40  # the consonants, each drawn by every face (and no empty boxes)
    images = data.images(0)
    assert images[:, :, 0, :].mean() < 2 and images.max() == 255  # bright strokes on a dark background
    build_glyphs(fonts, tmp_path / "b", progress=lambda m: None)
    assert dataset_fingerprint(tmp_path / "a") == dataset_fingerprint(tmp_path / "b")  # seeded: the same shards
    with pytest.raises(ShardError, match="apt-get install fonts-noto-core"):
        build_glyphs(tmp_path / "nowhere", tmp_path / "c", progress=lambda m: None)


def image_checkpoint(run: Path, size: int, *algorithm: str) -> Path:
    """A checkpoint (ProtoNets unless ``algorithm`` says) of a run on synthetic size x size images, as
    training writes one."""
    cfg = load_config(
        None,
        [
            *("task.source=synthetic", f"task.image_size={size}", "model.name=conv4", "model.filters=8"),
            *(algorithm or ["algorithm.name=protonet"]),
            "eval.queries=5",
        ],
    )
    cfg.task.image_format = ImageFormat(channels=1, height=size, width=size)
    torch.manual_seed(0)
    learner = build_learner(cfg, build_source(cfg.task).spec, "classification")
    params = flat_parameters(learner.initial_parameters(), torch.float32)
    CheckpointStore(run / "checkpoints").write("final.pt", checkpoint_record(cfg, params, 3))
    return run / "checkpoints" / "final.pt"


def test_evaluate_scores_a_checkpoint_on_another_datasets_episodes(fashion_mnist_src, tmp_path, cli_env):
    build_fashion_mnist(fashion_mnist_src, tmp_path / "fashion", progress=lambda m: None)
    checkpoint = image_checkpoint(tmp_path / "run", 28)
    command = [sys.executable, "-m", "distmeta", "evaluate", "--checkpoint", str(checkpoint)]
    command += ["--shards", str(tmp_path / "fashion"), "--episodes", "30"]
    run = subprocess.run(command, capture_output=True, text=True, env=cli_env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"on other data: {tmp_path / 'fashion'} (default/test), trained on synthetic" in run.stdout
    printed = float(re.search(r"\n\s+\d+\s+0\s+accuracy\s+([0-9.]+)", run.stdout).group(1))

    from distmeta.checkpoint import load_checkpoint

    cfg, params, _ = load_checkpoint(checkpoint)
    cfg, model_data = on_other_data(cfg, params.size, str(tmp_path / "fashion"), "test")
    cfg.eval.num_tasks = 30
    (row,) = evaluate(cfg, params, model_data=model_data)  # the same episodes in this process
    assert printed == pytest.approx(row.mean, abs=5e-5) and row.tasks == 30

    val = subprocess.run([*command, "--split", "val"], capture_output=True, text=True, env=cli_env, cwd=ROOT)
    assert val.returncode == 2 and "has no split default/val (it has default/test, default/train)" in val.stderr
    small = image_checkpoint(tmp_path / "small", 16)
    command[command.index(str(checkpoint))] = str(small)
    mismatch = subprocess.run(command, capture_output=True, text=True, env=cli_env, cwd=ROOT, timeout=300)
    assert mismatch.returncode == 2
    assert "holds images of shape [1, 28, 28], the checkpoint's model takes [1, 16, 16]" in mismatch.stderr


def test_the_baseline_keeps_its_head_over_the_training_classes_on_another_dataset(fashion_mnist_src, tmp_path):
    """Its model is sized by the training data (one output per training class), not by the episodes'."""
    build_fashion_mnist(fashion_mnist_src, tmp_path / "fashion", progress=lambda m: None)
    checkpoint = image_checkpoint(tmp_path / "run", 28, "algorithm.name=baseline", "task.labels=class")
    from distmeta.checkpoint import load_checkpoint

    cfg, params, _ = load_checkpoint(checkpoint)
    cfg, (spec, _) = on_other_data(cfg, params.size, str(tmp_path / "fashion"), "test")
    assert spec.output_dim == 160  # synthetic's 200 classes, a fifth held out
    cfg.eval.num_tasks, cfg.eval.inner_steps = 20, [0, 5]
    rows = evaluate(cfg, params, model_data=(spec, "classification"))
    assert [r.steps for r in rows] == [0, 5] and all(r.tasks == 20 for r in rows)


def test_a_dataset_of_test_classes_alone_scores_a_checkpoint(tmp_path):
    """Held-out episodes of another dataset need none of its training split (here: empty), nor
    classes big enough for the checkpoint's training episodes."""
    from distmeta.checkpoint import load_checkpoint
    from distmeta.data.folder import build_folder
    from distmeta.train import _checked_source

    rng = np.random.default_rng(0)
    for c in range(6):
        (tmp_path / "src" / f"c{c}").mkdir(parents=True)
        for i in range(4):  # fewer than the checkpoint's training shots + queries
            Image.fromarray(rng.integers(0, 256, (20, 16), dtype=np.uint8)).save(
                tmp_path / "src" / f"c{c}" / f"{i}.png"
            )
    (tmp_path / "splits.json").write_text(json.dumps({"test": [f"c{c}" for c in range(6)]}))
    build_folder(tmp_path / "src", tmp_path / "mine", 16, tmp_path / "splits.json", progress=lambda m: None)
    cfg, params, _ = load_checkpoint(image_checkpoint(tmp_path / "run", 16))
    cfg, model_data = on_other_data(cfg, params.size, str(tmp_path / "mine"), "test")
    cfg.eval.num_tasks, cfg.eval.shots, cfg.eval.queries = 10, [1], 3
    (row,) = evaluate(cfg, params, model_data=model_data)
    assert row.tasks == 10 and 0 <= row.mean <= 1
    # training on them is refused up front, naming the empty split
    train_cfg = load_config(None, ["task.source=shards", "model.name=conv4", f"task.shards={tmp_path / 'mine'}"])
    train_cfg = load_config(None, ["task.split_scheme=default", "task.rotations=false"], base=train_cfg.to_dict())
    with pytest.raises(ShardError, match="split 'train' has only 0 classes"):
        _checked_source(train_cfg)


def test_rotations_of_images_that_are_not_square_are_refused(tmp_path):
    from distmeta.config import ConfigError
    from distmeta.data.shards import ClassImages, write_shards

    images = np.zeros((4, 1, 8, 12), np.uint8)
    write_shards(tmp_path / "wide", [ClassImages(f"c{i}", "g", images) for i in range(6)], {"s/train": list(range(6))})
    cfg = load_config(None, ["task.source=shards", "model.name=conv4", f"task.shards={tmp_path / 'wide'}"])
    cfg = load_config(None, ["task.split_scheme=s"], base=cfg.to_dict())
    with pytest.raises(ConfigError, match="shards at .* hold 8x12 images: set task.rotations=false"):
        build_source(cfg.task)
    cfg = load_config(None, ["task.rotations=false"], base=cfg.to_dict())
    assert build_source(cfg.task).spec.input_shape == (1, 8, 12)
