"""`distmeta adapt` and `distmeta.adapt`: a checkpoint adapted to a user's own labelled images.

The adapted parameters and the predictions are checked in float64 against a plain reference
written here (SGD on the cross-entropy with torch.func, prototypes from the embeddings, each query
with the support set alone); the images must reach the network exactly as the training shards
stored them (real Omniglot PNGs against the shards built from the same zips)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.func import functional_call

import distmeta
from distmeta.adaptation import AdaptError, _prepared
from distmeta.algorithms import build_learner
from distmeta.checkpoint import CheckpointStore, checkpoint_record, read_checkpoint
from distmeta.config import ConfigError, ImageFormat, config_from_dict, load_config
from distmeta.models import DataSpec, build_model
from distmeta.params import ParamLayout, flat_parameters
from distmeta.tasks import ShardEpisodes

ROOT = Path(__file__).resolve().parent.parent
SIZE = 16
FORMAT = ImageFormat(channels=1, height=SIZE, width=SIZE)


def conv4_checkpoint(
    folder: Path, *overrides: str, ways: int = 5, outputs: int = 0, fmt: ImageFormat = FORMAT, **extra
) -> Path:
    """A float64 Conv4 checkpoint of a synthetic-image run, its parameters the seed's initialisation
    plus noise (so a head's rows differ), as training writes it; its head has ``outputs`` rows
    (default: ``ways``; the baseline's: one per training class)."""
    cfg = load_config(
        None,
        [
            "task.source=synthetic",
            f"task.ways={ways}",
            f"task.image_size={SIZE}",
            "model.name=conv4",
            "model.filters=6",
            "train.dtype=float64",
            "algorithm.inner_lr=0.3",
            *overrides,
        ],
    )
    cfg.task.image_format = fmt
    torch.manual_seed(0)
    spec = DataSpec((1, SIZE, SIZE), outputs or ways)
    learner = build_learner(cfg, spec, "classification", dtype=torch.float64)
    params = flat_parameters(learner.initial_parameters(), torch.float64)
    params = params + 0.05 * torch.randn_like(params)
    state = checkpoint_record(cfg, params, 7) | extra
    CheckpointStore(folder).write("model.pt", state)
    return folder / "model.pt"


def conv4(classes: int, head: str = "linear") -> torch.nn.Module:
    """The checkpoints' network built by hand, float64, with ``classes`` outputs (0: the embedding)."""
    model_cfg = load_config(None, ["model.name=conv4", "model.filters=6", f"model.head={head}"]).model
    return build_model(model_cfg, DataSpec((1, SIZE, SIZE), classes)).double()


def images(seed: int, count: int, size: int = SIZE) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(count)]


def reference_inputs(pixels: list[np.ndarray]) -> torch.Tensor:
    return torch.tensor(np.stack(pixels)[:, None], dtype=torch.float64) / 255.0


def reference_weights(checkpoint: Path, classes: int, outputs: int = 0) -> dict[str, torch.Tensor]:
    """The checkpoint's network (a head of ``outputs`` rows, default: its ways), read with the loader
    and its head cut to ``classes`` rows by hand."""
    state = read_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"])
    spec = DataSpec((1, SIZE, SIZE), outputs or cfg.task.ways)
    full = build_learner(cfg, spec, "classification", dtype=torch.float64)
    layout = ParamLayout.of(full.initial_parameters())
    named = layout.unflatten(state["params"])
    return {n: (p[:classes] if n.startswith(("head.", "inner_lr.head.")) else p).clone() for n, p in named.items()}


def plain_sgd(model, weights, x, y, steps, lr, adapted_names):
    """``steps`` SGD steps of the mean cross-entropy on (x, y), of ``adapted_names`` only; ``lr`` a
    number or a per-parameter dict (Meta-SGD)."""
    weights = dict(weights)
    for _ in range(steps):
        current = {n: weights[n].detach().requires_grad_(n in adapted_names) for n in model.state_dict()}
        loss = F.cross_entropy(functional_call(model, current, (x,)), y)
        grads = torch.autograd.grad(loss, [current[n] for n in adapted_names])
        for name, grad in zip(adapted_names, grads):
            rate = lr[name] if isinstance(lr, dict) else lr
            weights[name] = weights[name] - rate * grad
    return weights


def one_at_a_time(model, weights, support_x, query_x):
    """Each query's logits from a batch of the support set and that query alone."""
    return torch.stack([functional_call(model, weights, (torch.cat([support_x, q[None]]),))[-1] for q in query_x])


@pytest.mark.parametrize("algorithm", ["maml", "reptile", "anil", "metasgd"])
def test_adapted_network_and_predictions_match_plain_sgd_in_float64(tmp_path, algorithm):
    checkpoint = conv4_checkpoint(tmp_path, f"algorithm.name={algorithm}")
    support, query = images(1, 6), images(2, 4)
    labels = ["b", "a", "c", "a", "b", "c"]  # 3 of the head's 5 classes, in no order
    predictor = distmeta.adapt(checkpoint, support, labels, steps=3)
    assert predictor.classes == ["a", "b", "c"]

    weights = reference_weights(checkpoint, 3)
    model = conv4(3)
    x = reference_inputs(support)
    y = torch.tensor([["a", "b", "c"].index(label) for label in labels])
    names = [n for n, _ in model.named_parameters()]
    adapted_names = [n for n in names if n.startswith("head.")] if algorithm == "anil" else names
    lr = {n: weights[f"inner_lr.{n}"] for n in names} if algorithm == "metasgd" else 0.3
    expected = plain_sgd(model, {n: weights[n] for n in names}, x, y, 3, lr, adapted_names)

    adapted = predictor.state_dict()
    assert sorted(adapted) == sorted(names)
    for name in names:
        torch.testing.assert_close(adapted[name], expected[name], rtol=1e-9, atol=1e-11, msg=name)
    logits = one_at_a_time(model, expected, x, reference_inputs(query))
    np.testing.assert_allclose(predictor.probabilities(query), torch.softmax(logits, -1).numpy(), rtol=1e-8, atol=1e-12)
    best = [p.label for p in predictor.predict(query)]
    assert best == [["a", "b", "c"][i] for i in logits.argmax(-1).tolist()]
    # a prediction is each image's own, whichever images are classified with it
    np.testing.assert_allclose(predictor.probabilities(query[2:3]), predictor.probabilities(query)[2:3], rtol=1e-12)


def test_prototypes_and_matching_predictions_match_the_embeddings(tmp_path):
    support, query = images(3, 6), images(4, 3)
    labels = ["x", "y", "z", "x", "y", "w"]
    classes = ["w", "x", "y", "z"]
    for algorithm in ("protonet", "matchingnet"):
        checkpoint = conv4_checkpoint(tmp_path / algorithm, f"algorithm.name={algorithm}")
        predictor = distmeta.adapt(checkpoint, support, labels)
        assert not predictor.adaptive and predictor.classes == classes
        weights = reference_weights(checkpoint, 4)
        embed = conv4(0)
        one_hot = F.one_hot(torch.tensor([classes.index(label) for label in labels]), 4).double()
        rows = []
        for q in reference_inputs(query):
            embedded = functional_call(embed, weights, (torch.cat([reference_inputs(support), q[None]]),))
            s, e = embedded[:-1], embedded[-1]
            if algorithm == "protonet":  # minus the squared distance to each class's mean embedding
                prototypes = one_hot.T @ s / one_hot.sum(0)[:, None]
                rows.append(-(e - prototypes).pow(2).sum(-1))
            else:  # attention: softmax over cosine similarities to the support examples, summed per class
                attention = torch.softmax(F.cosine_similarity(e[None], s, dim=-1), 0)
                rows.append((attention @ one_hot).log())
        expected = torch.softmax(torch.stack(rows), -1).numpy()
        np.testing.assert_allclose(predictor.probabilities(query), expected, rtol=1e-6, atol=1e-9, err_msg=algorithm)
        with pytest.raises(AdaptError, match="adapts no network"):
            predictor.state_dict()
        with pytest.raises(AdaptError, match="has no inner loop"):
            distmeta.adapt(checkpoint, support, labels, steps=2)


def test_images_drawn_the_other_way_round_are_inverted_on_request(tmp_path):
    """``invert`` overrides the checkpoint's inversion: images adapted with it are those the
    checkpoint's own format would take as 255 - pixel, and the predictor records it."""
    checkpoint = conv4_checkpoint(tmp_path, "algorithm.name=maml")  # trained on images it did not invert
    support, query = images(3, 4), images(4, 3)
    labels = ["a", "b", "a", "b"]
    flipped = distmeta.adapt(checkpoint, support, labels, steps=2, invert=True)
    reference = distmeta.adapt(checkpoint, [255 - x for x in support], labels, steps=2)
    assert flipped.image_format.invert and not reference.image_format.invert
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(flipped.state_dict()[name], value, rtol=0, atol=0, msg=name)
    np.testing.assert_array_equal(flipped.probabilities(query), reference.probabilities([255 - x for x in query]))
    assert not np.allclose(flipped.probabilities(query), reference.probabilities(query))
    unflipped = distmeta.adapt(checkpoint, support, labels, steps=2, invert=False)  # the checkpoint's own
    default = distmeta.adapt(checkpoint, support, labels, steps=2)
    np.testing.assert_array_equal(unflipped.probabilities(query), default.probabilities(query))


def test_bad_support_sets_and_checkpoints_get_clear_errors(tmp_path):
    checkpoint = conv4_checkpoint(tmp_path, ways=3)
    support = images(5, 4)
    adapt = distmeta.adapt
    error = AdaptError
    with pytest.raises(error, match="4 classes in the support set, but the checkpoint's head was trained for 3-way"):
        adapt(checkpoint, support, ["a", "b", "c", "d"])
    with pytest.raises(error, match="one class"):
        adapt(checkpoint, support, ["a"] * 4)
    with pytest.raises(error, match="4 support images but 3 labels"):
        adapt(checkpoint, support, ["a", "b", "c"])
    with pytest.raises(error, match="uint8"):
        adapt(checkpoint, [np.zeros((SIZE, SIZE), np.float32)] * 2, ["a", "b"])
    with pytest.raises(error, match=r"\(1, 16, 16\); .*channels last: transpose a C x H x W array"):
        adapt(checkpoint, [support[0][None], support[1][None]], ["a", "b"])
    grayscale = adapt(checkpoint, support[:2], ["a", "b"], steps=0)
    with_channel = adapt(checkpoint, [x[:, :, None] for x in support[:2]], ["a", "b"], steps=0)  # H x W x 1
    np.testing.assert_array_equal(grayscale.probabilities(support[2:]), with_channel.probabilities(support[2:]))
    mismatched = read_checkpoint(checkpoint)
    mismatched["params"] = mismatched["params"][:-1]
    CheckpointStore(tmp_path / "cut").write("model.pt", mismatched)
    with pytest.raises(error, match=r"parameters do not fit the model its config describes"):
        adapt(tmp_path / "cut" / "model.pt", support[:2], ["a", "b"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a picture")
    with pytest.raises(error, match=r"bad.png is not an image"):
        adapt(checkpoint, [bad, support[0]], ["a", "b"])
    newer = conv4_checkpoint(tmp_path / "newer", distmeta_version="99.0.0")
    with pytest.raises(error, match=r"written by distmeta 99.0.0, newer than this one"):
        adapt(newer, support[:2], ["a", "b"])
    candidate = conv4_checkpoint(tmp_path / "rc", distmeta_version=f"{distmeta.__version__}rc1")  # not newer
    assert adapt(candidate, support[:2], ["a", "b"]).classes == ["a", "b"]
    unrecorded = conv4_checkpoint(tmp_path / "old", "task.source=shards", "task.shards=/nowhere", fmt=ImageFormat())
    with pytest.raises(error, match=r"does not record how its training images were prepared.*task.shards=/nowhere"):
        adapt(unrecorded, support[:2], ["a", "b"])
    state = read_checkpoint(checkpoint)
    state["config"]["task"]["colour_space"] = "lab"  # a key of a version this one does not know
    CheckpointStore(tmp_path / "future").write("model.pt", state)
    with pytest.raises(error, match=r"whose config this version .* cannot read .*colour_space"):
        adapt(tmp_path / "future" / "model.pt", support[:2], ["a", "b"])
    for field, value in (("algorithm", "name"), ("task", "source")):
        state = read_checkpoint(checkpoint)
        state["config"][field][value] = "from_a_newer_version"  # a name this version does not have
        CheckpointStore(tmp_path / field).write("model.pt", state)
        with pytest.raises(error, match=rf"names {field}.{value}=from_a_newer_version, which this version"):
            adapt(tmp_path / field / "model.pt", support[:2], ["a", "b"])
    regression = tmp_path / "sine"
    cfg = load_config(None, [])
    CheckpointStore(regression).write("model.pt", checkpoint_record(cfg, torch.zeros(1761, dtype=torch.float64), 1))
    with pytest.raises(error, match="trained on sinusoid .regression.; adapt classifies images"):
        adapt(regression / "model.pt", support[:2], ["a", "b"])


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def test_command_line_writes_predictions_and_a_model_a_plain_module_loads(tmp_path, cli_env, monkeypatch):
    # trained with one step, evaluated after up to two: adapt takes as many as the evaluation
    checkpoint = conv4_checkpoint(tmp_path, "algorithm.name=maml", "eval.inner_steps=[0,2]")
    support_dir, query_dir = tmp_path / "support", tmp_path / "query"
    support = images(6, 4, size=20)  # any size: resized as the training images were
    labels = ["cat, tabby", "dog", "cat, tabby", "dog"]  # a comma: the printed CSV quotes it
    for i, (pixels, label) in enumerate(zip(support, labels)):
        write_png(support_dir / label / f"{i}.png", pixels)
    (support_dir / "cat, tabby" / ".DS_Store").write_bytes(b"\0")  # hidden files are no images
    query = images(7, 3, size=20)
    paths = [write_png(query_dir / f"q{i}.png", pixels) for i, pixels in enumerate(query)]
    (query_dir / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 not a picture")  # what a folder of photos holds
    (support_dir / "dog" / "notes.txt").write_text("the dogs")
    out = tmp_path / "adapted"  # the default --out, which the README's loading block reads
    command = [sys.executable, "-m", "distmeta", "adapt", "--checkpoint", str(checkpoint)]
    command += ["--support", str(support_dir), "--query", str(query_dir), "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, env=cli_env, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["query"] for r in rows] == [str(p) for p in paths]
    printed = list(csv.reader(run.stdout.splitlines()))
    assert printed[0] == ["query", "predicted", "probability"] and len(printed) == 4
    assert [row[:2] for row in printed[1:]] == [[r["query"], r["predicted"]] for r in rows]
    assert "1 file(s) in " + str(query_dir) + " are not images and are left out: Thumbs.db" in run.stderr
    assert "are not images and are left out: notes.txt" in run.stderr

    predictor = distmeta.adapt(checkpoint, [Image.open(p) for p in sorted(support_dir.rglob("*.png"))], sorted(labels))
    expected = predictor.predict([Image.open(p) for p in paths])
    assert [r["predicted"] for r in rows] == [p.label for p in expected]
    np.testing.assert_allclose([float(r["probability"]) for r in rows], [p.probability for p in expected], atol=1e-6)

    record = json.loads((out / "adapted.json").read_text())
    assert record["classes"] == ["cat, tabby", "dog"] and record["steps"] == 2
    assert record["image_format"]["height"] == SIZE
    section = (ROOT / "README.md").read_text().split("### Adapting a trained model to your own images\n", 1)[1]
    loading = section.split("```python\n", 1)[1].split("```", 1)[0]  # README: adapted.pt in a plain module
    assert "adapted.pt" in loading
    monkeypatch.chdir(tmp_path)
    user = {}
    exec(compile(loading, "README.md", "exec"), user)
    model = user["model"]
    assert type(model) is type(conv4(2)) and model.state_dict().keys() == predictor.state_dict().keys()
    for name, value in predictor.state_dict().items():  # float64 adapted, loaded into float32
        torch.testing.assert_close(model.state_dict()[name], value.float())

    inverted = [*command[:-1], str(tmp_path / "inverted"), "--invert"]  # drawn the other way round
    run = subprocess.run(inverted, capture_output=True, text=True, env=cli_env, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "inverted" / "adapted.json").read_text())["image_format"]["invert"] is True

    again = subprocess.run(command, capture_output=True, text=True, env=cli_env, cwd=ROOT, timeout=120)
    assert again.returncode == 2 and "already holds predictions.csv" in again.stderr  # nothing is overwritten
    command[command.index(str(out))] = str(out / "predictions.csv" / "inside")  # below a file: refused at once
    below_a_file = subprocess.run(command, capture_output=True, text=True, env=cli_env, cwd=ROOT, timeout=120)
    assert below_a_file.returncode == 2 and "predictions.csv is a file): choose another --out" in below_a_file.stderr
    assert "adapting" not in below_a_file.stderr
    command[command.index(str(out / "predictions.csv" / "inside"))] = str(out)
    named = [*command[:-1], str(tmp_path / "out3"), "--query", str(query_dir / "Thumbs.db")]
    not_an_image = subprocess.run(named, capture_output=True, text=True, env=cli_env, cwd=ROOT, timeout=120)
    assert (
        not_an_image.returncode == 2 and "Thumbs.db is not an image in a format distmeta reads" in not_an_image.stderr
    )
    assert "adapting" not in not_an_image.stderr  # refused before any work
    damaged = support_dir / "dog" / "5.jpg"  # named as a photo, not one at all: refused, not skipped
    damaged.write_bytes(b"\x00 half a photo")
    (support_dir / "dog" / "6.png").write_bytes(b"\x89PNG cut short")  # every other one named too
    (support_dir / "dog" / "7.mpo").write_bytes(b"\xff\xd8 a camera's cut short")  # Pillow's MPO is a JPEG
    command[command.index(str(out))] = str(tmp_path / "out4")
    one_shot_lost = subprocess.run(command, capture_output=True, text=True, env=cli_env, cwd=ROOT, timeout=120)
    assert one_shot_lost.returncode == 2 and f"{damaged} is not an image in a format" in one_shot_lost.stderr
    assert "replace or remove it (and 2 more named as images that do not decode: 6.png, 7.mpo)" in one_shot_lost.stderr
    assert "adapting" not in one_shot_lost.stderr
    command[command.index(str(tmp_path / "out4"))] = str(out)
    damaged.unlink()
    (support_dir / "dog" / "6.png").unlink()
    (support_dir / "dog" / "7.mpo").unlink()
    (support_dir / "dog" / "1.png").unlink()
    (support_dir / "dog" / "3.png").unlink()
    command[command.index(str(out))] = str(tmp_path / "out2")
    empty = subprocess.run(command, capture_output=True, text=True, env=cli_env, cwd=ROOT, timeout=120)
    assert empty.returncode == 2 and "class folder(s) dog" in empty.stderr and "at least one" in empty.stderr


def test_omniglot_files_reach_the_network_as_the_training_shards_stored_them(omniglot_src, omniglot_shards, tmp_path):
    """A drawing from the official zip, prepared by adapt with the format training recorded, equals
    the shard's row for it (decoded, resized, inverted, scaled)."""
    source = ShardEpisodes(str(omniglot_shards), "maml", 5, rotations=False)
    fmt = source.image_format
    assert fmt == ImageFormat(channels=1, height=28, width=28, invert=True)
    name = "images_evaluation/Atlantean/character01"
    with zipfile.ZipFile(omniglot_src / "images_evaluation.zip") as z:
        files = sorted(n for n in z.namelist() if n.startswith(name + "/") and n.endswith(".png"))
        (tmp_path / "drawing.png").write_bytes(z.read(files[3]))
    index = [c["name"] for c in source.data.classes].index("Atlantean/character01")
    stored = source.data.gather(source.shard[index], np.array([source.first_row[index] + 3]))[0]
    np.testing.assert_array_equal(_prepared([tmp_path / "drawing.png"], fmt)[0], stored)


def test_the_transfer_baseline_adapts_a_new_head_of_any_number_of_classes(tmp_path):
    """A baseline checkpoint (head over its training classes) serves more classes than an episode had:
    its head is replaced, at 0 steps by the support set's class centroids (nearest centroid)."""
    # a head over 11 training classes, trained on 3-way episodes of them: the checkpoint's parameters
    # say how many (no training data is at hand to count them)
    checkpoint = conv4_checkpoint(tmp_path, "algorithm.name=baseline", "task.labels=class", ways=3, outputs=11)
    support, query = images(8, 6), images(9, 3)
    labels = ["a", "b", "c", "d", "e", "f"]  # six classes, one image each
    predictor = distmeta.adapt(checkpoint, support, labels, steps=0)
    model = conv4(0)
    weights = reference_weights(checkpoint, 6, outputs=11)
    weights = {n.removeprefix("features."): p for n, p in weights.items() if "features." in n}
    x = reference_inputs(support)
    centroids = functional_call(model.features, weights, (x,))  # one image per class: its features
    expected = []
    for q in reference_inputs(query):  # each query in a batch with the support set
        feature = functional_call(model.features, weights, (torch.cat([x, q[None]]),))[-1]
        expected.append(-((feature - centroids) ** 2).sum(-1))
    probabilities = torch.softmax(torch.stack(expected), -1).numpy()
    np.testing.assert_allclose(predictor.probabilities(query), probabilities, rtol=1e-8, atol=1e-12)
    assert predictor.state_dict()["head.weight"].shape == (6, 6 * 1)  # filters x 1 x 1 features


def test_baseline_plus_plus_adapts_a_cosine_head_a_plain_module_runs(tmp_path):
    """Baseline++ (model.head=cosine): at 0 steps each query's scores are 2 cos(its feature, a class
    centroid) (2: the scale of six classes); after steps the adapted head is a plain cosine module's."""
    head = ("algorithm.name=baseline", "task.labels=class", "model.head=cosine")
    checkpoint = conv4_checkpoint(tmp_path, *head, ways=3, outputs=11)
    support, query = images(8, 6), images(9, 3)
    labels = ["a", "b", "c", "d", "e", "f"]
    weights = reference_weights(checkpoint, 6, outputs=11)
    assert "head.bias" not in weights
    body = {n.removeprefix("features."): p for n, p in weights.items() if "features." in n}
    model, x = conv4(0), reference_inputs(support)
    centroids = functional_call(model.features, body, (x,))  # one image per class: its features
    expected = []
    for q in reference_inputs(query):
        feature = functional_call(model.features, body, (torch.cat([x, q[None]]),))[-1]
        cosines = (centroids @ feature) / (centroids.norm(dim=1) * feature.norm())
        expected.append(2.0 * cosines)
    probabilities = torch.softmax(torch.stack(expected), -1).numpy()
    at_centroids = distmeta.adapt(checkpoint, support, labels, steps=0)
    np.testing.assert_allclose(at_centroids.probabilities(query), probabilities, rtol=1e-8, atol=1e-12)
    adapted = distmeta.adapt(checkpoint, support, labels, steps=3)
    plain = conv4(6, head="cosine")
    plain.load_state_dict(adapted.state_dict())  # no bias: the head is the cosine module's
    by_module = [torch.softmax(plain(torch.cat([x, q[None]]))[-1], -1) for q in reference_inputs(query)]
    np.testing.assert_allclose(adapted.probabilities(query), torch.stack(by_module).detach().numpy(), rtol=1e-8)
    assert not np.allclose(adapted.probabilities(query), probabilities)  # the steps moved the head


def test_the_baseline_adapts_as_it_is_evaluated_and_takes_its_test_time_settings(tmp_path, cli_env):
    """By default as many steps as its evaluation takes, from its config's head (zero, Chen et al.'s
    fine-tuning); 0 steps from a zero head predicts nothing and is refused; the nearest-centroid
    head is one setting away, from Python and the command line; settings that would change what
    was trained, or a learner without test-time settings, are refused. The training data is gone:
    the head's size comes from the checkpoint."""
    head = ("algorithm.name=baseline", "task.labels=class", "eval.inner_steps=[4]")
    head += ("task.source=shards", "task.shards=/nowhere")
    zero = conv4_checkpoint(tmp_path / "zero", *head, "algorithm.head_init=zero", ways=3, outputs=11)
    centroid = conv4_checkpoint(tmp_path / "centroid", *head, "algorithm.head_init=centroid", ways=3, outputs=11)
    support, query, labels = images(8, 4), images(9, 3), ["a", "b", "c", "d"]
    assert distmeta.adapt(zero, support, labels).steps == 4
    with pytest.raises(AdaptError, match="--steps 0 with algorithm.head_init=zero"):
        distmeta.adapt(zero, support, labels, steps=0)
    overridden = distmeta.adapt(zero, support, labels, steps=0, overrides=["algorithm.head_init=centroid"])
    expected = distmeta.adapt(centroid, support, labels, steps=0)  # the same parameters, written so
    np.testing.assert_array_equal(overridden.probabilities(query), expected.probabilities(query))
    from_centroids = distmeta.adapt(centroid, support, labels)  # its config's head, then its 4 steps
    told = distmeta.adapt(zero, support, labels, overrides=["algorithm.head_init=centroid"])
    np.testing.assert_array_equal(from_centroids.probabilities(query), told.probabilities(query))
    assert not np.allclose(
        from_centroids.probabilities(query), distmeta.adapt(zero, support, labels).probabilities(query)
    )
    with pytest.raises(AdaptError, match=r"test-time algorithm.finetune, algorithm.head_init, got \['eval.ways=3'\]"):
        distmeta.adapt(zero, support, labels, overrides=["eval.ways=3"])
    maml = conv4_checkpoint(tmp_path / "maml", "algorithm.name=maml", ways=4)
    with pytest.raises(AdaptError, match="test-time settings of the transfer baseline; maml has none"):
        distmeta.adapt(maml, support, labels, overrides=["algorithm.head_init=centroid"])

    for label, pixels in zip(labels, support):
        write_png(tmp_path / "support" / label / "1.png", pixels)
    queries = [write_png(tmp_path / "query" / f"q{i}.png", pixels) for i, pixels in enumerate(query)]
    command = [sys.executable, "-m", "distmeta", "adapt", "--checkpoint", str(zero), "--support"]
    command += [str(tmp_path / "support"), "--steps", "0", "--out", str(tmp_path / "out"), "--query"]
    command += [str(tmp_path / "query"), "algorithm.head_init=centroid"]  # a setting after the query paths
    run = subprocess.run(command, capture_output=True, text=True, env=cli_env, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    printed = [float(line.split(",")[2]) for line in run.stdout.splitlines()[1:]]
    np.testing.assert_allclose(printed, overridden.probabilities(queries).max(1), atol=1e-4)
    command[-1] = "eval.ways=3"  # not a file: a setting, which adapt refuses by name
    command[command.index(str(tmp_path / "out"))] = str(tmp_path / "out2")
    refused = subprocess.run(command, capture_output=True, text=True, env=cli_env, cwd=ROOT, timeout=120)
    assert refused.returncode == 2 and "got ['eval.ways=3']" in refused.stderr


def test_transparent_drawings_and_phone_photos_reach_the_network_as_they_are_seen(tmp_path):
    """Strokes on a transparent background lie on white (not on the black that dropping alpha
    leaves); a photo with an EXIF orientation is turned upright, as a viewer shows it. Shard
    builders prepare their files with the same function."""
    drawing = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)  # transparent black everywhere ...
    drawing[:, : SIZE // 2, 3] = 255  # ... but the left half: opaque black strokes
    Image.fromarray(drawing, "RGBA").save(tmp_path / "drawing.png")
    expected = np.full((1, SIZE, SIZE), 255, dtype=np.uint8)
    expected[:, :, : SIZE // 2] = 0
    np.testing.assert_array_equal(_prepared([tmp_path / "drawing.png"], FORMAT)[0], expected)

    stored = np.arange(8 * 16, dtype=np.uint8).reshape(8, 16)  # 16 wide, 8 high, as the sensor wrote it
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the viewer turns it 90 degrees clockwise
    Image.fromarray(stored, "L").save(tmp_path / "photo.png", exif=exif)
    upright = ImageFormat(channels=1, height=16, width=8)
    np.testing.assert_array_equal(_prepared([tmp_path / "photo.png"], upright)[0, 0], np.rot90(stored, k=-1))


@pytest.mark.parametrize("kind", ["linear", "cosine"])  # Baseline and Baseline++
def test_an_exported_baseline_leaves_out_its_training_head_and_adapts_and_evaluates_as_before(tmp_path, cli_env, kind):
    """Its tests replace the head over its training classes, so `checkpoint export` leaves it out: the
    file holds the features alone, and adapts and scores exactly as the checkpoint it came from (a
    cosine one with a cosine head, though the export holds none). A learner whose head serves its
    tests keeps it."""
    from distmeta.checkpoint import export_checkpoint

    head = ("algorithm.name=baseline", "task.labels=class", "eval.inner_steps=[0,2]", "eval.num_tasks=6")
    full = conv4_checkpoint(tmp_path / "run", *head, f"model.head={kind}", ways=3, outputs=11)
    exported = Path(export_checkpoint(full, tmp_path / "zoo" / "baseline.pt"))
    cfg = config_from_dict(read_checkpoint(full)["config"])
    features = build_model(cfg.model, DataSpec((1, SIZE, SIZE), 0)).state_dict()
    kept = read_checkpoint(exported)["params"]
    assert read_checkpoint(exported)["distmeta_version"] == distmeta.__version__  # what an older version cannot read
    assert kept.numel() == sum(p.numel() for p in features.values())
    np.testing.assert_array_equal(kept.numpy(), read_checkpoint(full)["params"].numpy()[: kept.numel()])

    support, query, labels = images(8, 4), images(9, 3), ["a", "b", "c", "d"]
    starts = [(["algorithm.head_init=zero"], 2)] if kind == "linear" else []
    if kind == "cosine":  # a zero weight has no direction: refused as a test-time setting too
        with pytest.raises(AdaptError, match="a zero weight has no direction"):
            distmeta.adapt(exported, support, labels, steps=2, overrides=["algorithm.head_init=zero"])
    for overrides, steps in [([], 0), *starts, (["algorithm.finetune=all"], 2)]:
        before = distmeta.adapt(full, support, labels, steps=steps, overrides=overrides)
        after = distmeta.adapt(exported, support, labels, steps=steps, overrides=overrides)
        np.testing.assert_array_equal(after.probabilities(query), before.probabilities(query))
        for name, value in before.state_dict().items():
            torch.testing.assert_close(after.state_dict()[name], value, rtol=0, atol=0)

    scores = []
    for checkpoint in (full, exported):  # a setting after a flag of several values is a setting
        command = [sys.executable, "-m", "distmeta", "evaluate", "--checkpoint", str(checkpoint), "--steps", "0"]
        command += ["2", "algorithm.finetune=all"]
        run = subprocess.run(command, capture_output=True, text=True, env=cli_env, cwd=ROOT, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        scores.append(run.stdout.split("protocol:", 1)[1])
    assert scores[0] == scores[1] and "accuracy" in scores[0]
    assert "inner steps [0, 2]" in scores[0] and "its steps training all" in scores[0]
    assert ("a new cosine head (Baseline++) from" in scores[0]) == (kind == "cosine")  # the protocol says which

    from distmeta.tasks import build_source
    from distmeta.train import _initial_parameters

    cfg.train.init_from = str(exported)  # a new run cannot start from it: said so
    with pytest.raises(ConfigError, match="an export of the baseline leaves out its head over the training"):
        _initial_parameters(cfg, build_source(cfg.task), resume=False)

    maml = conv4_checkpoint(tmp_path / "maml", "algorithm.name=maml", ways=4)
    exported_maml = export_checkpoint(maml, tmp_path / "zoo" / "maml.pt")
    np.testing.assert_array_equal(read_checkpoint(exported_maml)["params"], read_checkpoint(maml)["params"])
